"""The registry of stage kinds: kind -> its `StageKind`, imported lazily from "module:attribute".

Kept apart from `optforge.stages.base` (the contract every stage module imports), so that naming the
stage modules here does not make them import their own registry back (no import cycle).
"""

from __future__ import annotations

import importlib

from optforge.errors import OptforgeError
from optforge.stages.base import StageKind

# kind -> "module:attribute" of its StageKind. Modules are imported lazily (they import torch).
_KINDS: dict[str, str] = {
    "data": "optforge.stages.data:KIND",
    "teacher": "optforge.stages.teacher:KIND",
    "student": "optforge.stages.student:KIND",
    "teacher_logits": "optforge.stages.teacher_logits:KIND",
    "distill": "optforge.stages.distill:KIND",
    "prune": "optforge.stages.prune:KIND",
    "quantize": "optforge.stages.quantize:KIND",
    "onnxruntime": "optforge.stages.onnxruntime:KIND",
    "compile": "optforge.stages.compile:KIND",
    "evaluate": "optforge.stages.evaluate:KIND",
    "benchmark": "optforge.stages.benchmark:KIND",
    "serve_benchmark": "optforge.stages.serve_benchmark:KIND",
    # task: causal-lm (optforge.graph names their stages as the classifier kinds': teacher, quantize:<c>, ...)
    "lm_data": "optforge.stages.lm_data:KIND",
    "lm_teacher": "optforge.stages.lm_teacher:KIND",
    "lm_student": "optforge.stages.lm_student:KIND",
    "lm_distill": "optforge.stages.lm_distill:KIND",
    "lm_prune": "optforge.stages.lm_prune:KIND",
    "lm_quantize": "optforge.stages.lm_quantize:KIND",
    "lm_compile": "optforge.stages.lm_compile:KIND",
    "lm_evaluate": "optforge.stages.lm_evaluate:KIND",
    "lm_benchmark": "optforge.stages.lm_benchmark:KIND",
}

# task -> the kind each model stage of its graph runs (the row stages come from `row_steps(task)`)
MODEL_KINDS: dict[str, dict[str, str]] = {
    "classification": {"data": "data", "teacher": "teacher", "student": "student",
                       "teacher_logits": "teacher_logits", "distill": "distill", "prune": "prune"},
    "causal-lm": {"data": "lm_data", "teacher": "lm_teacher", "student": "lm_student", "distill": "lm_distill",
                  "prune": "lm_prune"},
}


def known_kinds() -> list[str]:
    return sorted(_KINDS)


def register(kind: str, target: str) -> None:
    """Plugins register a kind as "package.module:ATTRIBUTE" (imported only when that kind is used)."""
    _KINDS[kind] = target


def row_steps(task: str = "classification") -> list[StageKind]:
    """The kinds a configuration of a `task` recipe runs, in row order (imports every registered stage
    module; no torch)."""
    kinds = [get_kind(k) for k in _KINDS]
    return sorted((k for k in kinds if k.row is not None and k.task == task), key=lambda k: k.row.order)


def row_kinds(task: str = "classification") -> frozenset[str]:
    return frozenset(k.kind for k in row_steps(task))


def get_kind(kind: str) -> StageKind:

    if kind not in _KINDS:
        raise OptforgeError(f"unknown stage kind {kind!r} (known: {', '.join(known_kinds())})")
    module, attr = _KINDS[kind].split(":")
    return getattr(importlib.import_module(module), attr)
