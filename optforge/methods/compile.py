"""Compile modes (`configs[i].compile`): one registered definition each, plus the pure rules the compile
stage and the compiled-artifact loader share (warm-up shapes, the verification tolerance).

A mode declares what a recipe writes (`name`), the `torch.compile` mode it compiles with (`torch_mode`,
None: the default), the Inductor options it passes (`inductor_configs`), and whether on CUDA it means
CUDA graphs captured per shape bucket at load time (`cuda_graphs`: optforge.cudagraphs, faster to replay
than torch.compile's own reduce-overhead graph trees); `resolve(device)` says what it compiles as on a
device and why, when that differs. "none" is the absence of a compile stage. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class CompileMode:
    name: str
    torch_mode: Optional[str] = None  # torch.compile(mode=...): None is "default"
    inductor_configs: dict = field(default_factory=dict)  # AOTInductor options
    cuda_graphs: bool = False  # on CUDA: graphs captured per (batch, length) bucket by the loader
    summary: str = ""

    def resolve(self, device: str) -> tuple["CompileMode", Optional[str]]:
        """(the mode compiled on `device`, a note when that is not this one)."""
        if self.cuda_graphs and device != "cuda":
            return COMPILE_MODES["default"], f"{self.name} is CUDA graphs; on {device} compiled as default"
        if self.cuda_graphs:  # the code compiles as "default"; the loader captures the graphs over it
            return COMPILE_MODES["default"], None
        return self, None


COMPILE_MODES: dict[str, CompileMode] = {}


def register(mode: CompileMode) -> CompileMode:
    if mode.name in COMPILE_MODES:
        raise ValueError(f"compile mode {mode.name!r} is registered twice")
    COMPILE_MODES[mode.name] = mode
    return mode


NONE = "none"  # no compile stage
register(CompileMode("default", summary="torch.compile / AOTInductor with default options"))
register(CompileMode("max-autotune", torch_mode="max-autotune", inductor_configs={"max_autotune": True},
                     summary="autotuned GEMM templates (CPU: the C++ GEMM template)"))
register(CompileMode("reduce-overhead", cuda_graphs=True,
                     summary="CUDA graphs per shape bucket over the compiled code (CUDA; default elsewhere)"))


def mode_names() -> tuple[str, ...]:
    return (NONE, *COMPILE_MODES)


# --------------------------------------------------------------------------- shared rules

# max |compiled - eager| logit difference allowed, relative to the largest |logit| (at least 1): compiled
# fp32 code reorders sums (~1e-6); bf16/fp16 round differently once fused. A model with dynamically
# quantized activations (int8/fp8) amplifies any such difference: an activation that moves across a
# rounding boundary changes a whole quantization step. Compiled and eager are then two equally valid
# approximations of the float model, each within the quantization error q of it (the upstream quantize
# stage's max |quantized - float| logit difference), so |compiled - eager| <= 2q (triangle inequality).
# Allowed: float tolerance + 2q, and never less than 5% of the logit scale (seen on an H200: bf16 float8
# compiled vs eager 0.18 against 0.154 = tol + q). This check exists to catch broken compiled code, which
# is off by O(scale) or not finite; the accuracy of a compiled row is measured by its evaluate stage.
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 3e-2}
QUANTIZED_TOLERANCE = 5e-2


def allowed_difference(fmt: str, precision: str, scale: float, quant_error) -> float:
    base = TOLERANCE[precision] * max(scale, 1.0)
    if fmt == "float":
        return base
    floor = QUANTIZED_TOLERANCE * max(scale, 1.0)
    return floor if quant_error is None else max(floor, base + 2 * float(quant_error))


def warmup_shapes(max_batch: int, max_length: int) -> list[list[int]]:
    """Batch 1 is specialised by Dynamo (0/1 specialisation), so it gets its own graph; a batch >= 2 and
    the extremes of the sequence range cover the dynamic graph. The loader replays them in this order."""
    mid = max(2, min(17, max_length - 1))
    return [list(x) for x in sorted({(1, 3), (1, max_length), (2, mid), (max_batch, 3), (max_batch, max_length)})]


def verify_shapes(max_batch: int, max_length: int) -> list[tuple[int, int]]:
    """(batch, length) pairs at which compiled logits are compared with eager ones."""
    big = min(32, max_batch)
    mid = max(2, min(17, max_length - 1))
    return [(1, 3), (1, max_length), (big, 3), (big, max_length), (5 if max_batch >= 5 else 2, mid)]
