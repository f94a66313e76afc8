"""teacher_logits: the teacher's logits over the train split, computed once for every distillation.

`distill` and each prune's `recover` train against softened teacher logits. The teacher is frozen and
deterministic in eval mode, so one inference pass serves every epoch of every one of them (before this
stage each computed its own: 129 s + 122 s of a cold CPU build). The pass runs under the distillation's
training precision (bf16 autocast: about 2.5x faster on a CPU with AMX); the logits are stored as float32,
row i = train example i, in logits.safetensors."""

from __future__ import annotations

import time

from optforge.recipe import TeacherLogitsParams
from optforge.stages.base import StageContext, StageKind

LOGITS_FILE = "logits.safetensors"


def run(ctx: StageContext) -> dict:
    from safetensors.torch import save_file

    from optforge import training
    from optforge.stages.data import Splits

    spec: TeacherLogitsParams = ctx.params
    data = Splits(ctx.inputs["data"], ctx.input_metrics.get("data"))
    start = time.perf_counter()
    logits = training.teacher_logits(ctx.inputs["teacher"], data, ctx.device, spec.precision, spec.batch_size,
                                      bar=ctx.bar)
    seconds = time.perf_counter() - start
    save_file({"logits": logits.contiguous()}, str(ctx.out / LOGITS_FILE), metadata={"format": "pt"})
    ctx.log(f"teacher logits: {len(logits)} train examples in {seconds:.1f}s ({spec.precision})")
    return {"examples": len(logits), "num_labels": int(logits.shape[-1]) if len(logits) else 0,
            "seconds": seconds, "examples_per_s": len(logits) / seconds if seconds > 0 else None,
            "autocast": spec.precision}


def load(directory, train_size: int):
    """The logits tensor [train_size, C] of a teacher_logits artifact; a ValueError if it does not match
    the train split it is used with."""
    from safetensors.torch import load_file

    logits = load_file(str(directory / LOGITS_FILE))["logits"]
    if logits.ndim != 2 or logits.shape[0] != train_size:
        raise ValueError(f"teacher logits of shape {tuple(logits.shape)} do not match the {train_size} train "
                         f"examples")
    return logits


KIND = StageKind(kind="teacher_logits", version="1", params_model=TeacherLogitsParams, run=run)
