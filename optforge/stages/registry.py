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
}


def known_kinds() -> list[str]:
    return sorted(_KINDS)


def register(kind: str, target: str) -> None:
    """Plugins register a kind as "package.module:ATTRIBUTE" (imported only when that kind is used)."""
    _KINDS[kind] = target


def row_steps() -> list[StageKind]:
    """The kinds a configuration runs, in row order (imports every registered stage module; no torch)."""
    kinds = [get_kind(k) for k in _KINDS]
    return sorted((k for k in kinds if k.row is not None), key=lambda k: k.row.order)


def row_kinds() -> frozenset[str]:
    return frozenset(k.kind for k in row_steps())


def get_kind(kind: str) -> StageKind:

    if kind not in _KINDS:
        raise OptforgeError(f"unknown stage kind {kind!r} (known: {', '.join(known_kinds())})")
    module, attr = _KINDS[kind].split(":")
    return getattr(importlib.import_module(module), attr)
