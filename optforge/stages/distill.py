"""distill: train the student on the teacher's softened logits plus the labels.

The teacher's logits over the train split come from the teacher_logits stage (one inference pass,
shared with every prune recovery, instead of a teacher forward per step per epoch); only the student
trains, with loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE."""

from __future__ import annotations


from optforge.recipe import DistillSpec
from optforge.stages import teacher_logits
from optforge.stages.base import StageContext, StageKind


def run(ctx: StageContext) -> dict:
    from optforge import modeling, tokens, training
    from optforge.stages.data import Splits

    spec: DistillSpec = ctx.params
    data = Splits(ctx.inputs["data"], ctx.input_metrics.get("data"))
    student, s_tok, s_meta = modeling.load_classifier(ctx.inputs["student"])
    training.configure_threads()
    logits = teacher_logits.load(ctx.inputs["logits"], len(data.train_labels))
    stats = training.distill(student, s_tok, logits, data, spec, ctx.device, bar=ctx.bar, desc="distill")
    ctx.log(f"distill: {stats['steps']} steps, {stats['examples_per_s']:.1f} ex/s ({stats['autocast']}), "
            f"final loss {stats['final_loss']:.4f}")
    eval_ids = tokens.tokenize(s_tok, data.eval_texts, data.max_length)
    metrics = dict(stats)
    metrics.update(training.evaluate_model(student, eval_ids, data.eval_labels, s_tok.pad_token_id or 0,
                                           ctx.device, bar=ctx.bar))
    metrics["params"] = sum(p.numel() for p in student.parameters())
    modeling.save_classifier(student.cpu(), s_tok, {"max_length": s_meta["max_length"],
                                                    "source": s_meta.get("source", "student") + " + distill"},
                             ctx.out)
    return metrics


KIND = StageKind(kind="distill", version="2", params_model=DistillSpec, run=run)
