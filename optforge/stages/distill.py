"""distill: train the student on the teacher's softened logits plus the labels.

The teacher is frozen and deterministic in eval mode, so its logits over the train split are computed
once, up front (one inference pass instead of a teacher forward per step per epoch); then only the
student trains, with loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE."""

from __future__ import annotations

import time

from optforge.recipe import DistillSpec
from optforge.stages.base import StageContext, StageKind


def run(ctx: StageContext) -> dict:
    from optforge import modeling, training
    from optforge.stages.data import Splits

    spec: DistillSpec = ctx.params
    data = Splits(ctx.inputs["data"], ctx.input_metrics.get("data"))
    student, s_tok, s_meta = modeling.load_classifier(ctx.inputs["student"])
    teacher, t_tok, _ = modeling.load_classifier(ctx.inputs["teacher"])
    training.configure_threads()

    t_pad, s_pad = t_tok.pad_token_id or 0, s_tok.pad_token_id or 0
    t_ids = training.tokenize(t_tok, data.train_texts, data.max_length)
    same_tokenizer = type(t_tok) is type(s_tok) and t_tok.get_vocab() == s_tok.get_vocab()
    s_ids = t_ids if same_tokenizer else training.tokenize(s_tok, data.train_texts, data.max_length)

    start = time.perf_counter()
    teacher.to(ctx.device).eval()
    teacher_logits = training.predict_logits(teacher, t_ids, t_pad, ctx.device, batch_size=128)
    teacher_s = time.perf_counter() - start
    del teacher

    stats = training.train(student, s_ids, data.train_labels, spec, ctx.device, s_pad,
                           teacher_logits=teacher_logits, temperature=spec.temperature, alpha=spec.alpha,
                           bar=ctx.bar, desc="distill")
    ctx.log(f"distill: teacher logits {teacher_s:.1f}s, {stats['steps']} steps, "
            f"{stats['examples_per_s']:.1f} ex/s, final loss {stats['final_loss']:.4f}")
    eval_ids = training.tokenize(s_tok, data.eval_texts, data.max_length)
    metrics = dict(stats, teacher_logits_s=teacher_s)
    metrics.update(training.evaluate_model(student, eval_ids, data.eval_labels, s_pad, ctx.device))
    metrics["params"] = sum(p.numel() for p in student.parameters())
    modeling.save_classifier(student.cpu(), s_tok, {"max_length": s_meta["max_length"],
                                                    "source": s_meta.get("source", "student") + " + distill"},
                             ctx.out)
    return metrics


KIND = StageKind(kind="distill", version="1", params_model=DistillSpec, run=run)
