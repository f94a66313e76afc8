"""lm_distill (the `distill` stage of a causal-lm recipe): train the student on the train split's blocks
against the frozen teacher's next-token distributions: alpha * KL at temperature T (times T^2) + (1 - alpha)
* the LM loss (optforge.lm.train.distill_loss)."""

from __future__ import annotations

from optforge.recipe import DistillSpec
from optforge.stages.base import StageContext, StageKind


def run(ctx: StageContext) -> dict:
    from optforge.lm import model as lm_model
    from optforge.lm.train import train_blocks, train_lm

    spec: DistillSpec = ctx.params
    student, tokenizer, meta = lm_model.load_float(ctx.inputs["student"])
    teacher, _, _ = lm_model.load_float(ctx.inputs["teacher"])
    data = train_blocks(tokenizer, ctx.inputs["data"], int(meta["max_length"]))
    stats = train_lm(student, data, spec, ctx.device, teacher=teacher, temperature=spec.temperature,
                     alpha=spec.alpha, bar=ctx.bar, desc="distill")
    ctx.log(f"distill: {stats['steps']} steps, loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}")
    lm_model.save_float(student.cpu(), tokenizer, {"max_length": meta["max_length"],
                                                   "source": meta.get("source", "student") + " (distilled)"}, ctx.out)
    return stats


KIND = StageKind(kind="lm_distill", version="1", params_model=DistillSpec, run=run, task="causal-lm")
