"""Quantization methods: one registered definition each (`@register`), the only place a method is described.

A method declares
  - `name`: what a recipe writes as `quantize[i].method`;
  - `params`: a pydantic model of its own parameters (only `int4-weight-only` has one, `group_size`); the
    recipe accepts exactly these keys for this method and validates them with this model;
  - `devices` and `precisions`: where it runs; `check` turns anything else into a StageFailure before work;
  - `format`: how the artifact is saved and loaded (optforge.artifacts.quantized: "torch-int8-dynamic" is
    PyTorch's packed-params path, "torchao" the tensor-subclass path);
  - `compute_precision`: what its matmuls run in, for the hardware peak (None: the row's precision, as for
    weight-only methods that dequantize);
  - `apply(model, params, device)`: quantize the encoder's nn.Linear layers in place (the classification
    head, out_features = num_labels, stays float: too narrow for packed kernels, negligible cost) and
    return {"quantized": n, "skipped": n};
  - `onnxruntime`: what the method means in a `runtime: onnxruntime` row, one of ORT_QUANTIZATIONS (ONNX
    Runtime quantizes the exported graph itself: optforge.stages.onnxruntime), or None where it has no
    ONNX Runtime counterpart (the recipe refuses such a row, located).

Importing this module imports neither torch nor torchao (the recipe schema is built from it); `apply`
imports what it needs. Adding a method: a subclass here with `@register`, plus its case in
tests/stages/test_quantize.py (docs/ARCHITECTURE.md, "Adding a quantization method").
"""

from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from optforge.errors import OptforgeError, StageFailure


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantMethod:
    name: ClassVar[str]
    params: ClassVar[type[BaseModel]] = NoParams
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    # device -> the precisions it computes in there (absent device: any precision)
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {}
    format: ClassVar[str] = "torchao"
    compute_precision: ClassVar[Optional[str]] = None
    summary: ClassVar[str] = ""
    onnxruntime: ClassVar[Optional[str]] = None  # the ONNX Runtime quantization it maps to (ORT_QUANTIZATIONS)

    def check(self, precision: str, device: str) -> None:
        """StageFailure, before any work, for a combination that cannot run on this device."""
        if device not in self.devices:
            raise StageFailure(f"{self.name} runs on {' or '.join(d.upper() for d in self.devices)} only")
        allowed = self.precisions.get(device)
        if allowed is not None and precision not in allowed:
            raise StageFailure(self.precision_reason(precision, device, allowed))

    def precision_reason(self, precision: str, device: str, allowed: tuple[str, ...]) -> str:
        return f"{self.name} on {device} computes in {'/'.join(allowed)}; got precision {precision} (use {allowed[0]})"

    def apply(self, model, params: BaseModel, device: str) -> dict:
        raise NotImplementedError

    def accepts(self, linear, params: BaseModel, device: str) -> bool:
        """Whether this method's kernels take a Linear of this shape. In a causal LM (`QuantScope`) one it
        does not take stays float and counts as skipped; in a classifier's encoder the kernel's error is the
        row's StageFailure, as before."""
        return True

    def compute_precision_for(self, precision: str) -> str:
        return self.compute_precision or precision


QUANT_METHODS: dict[str, QuantMethod] = {}

# What a `runtime: onnxruntime` row can quantize to (optforge.stages.onnxruntime implements each):
#   int8-dynamic  onnxruntime.quantization.quantize_dynamic: int8 weights with a scale per output channel,
#                 activations quantized per tensor at run time (DynamicQuantizeMatMul / MatMulIntegerToFloat)
ORT_QUANTIZATIONS: tuple[str, ...] = ("int8-dynamic",)


def onnxruntime_methods() -> list[str]:
    """The methods a `runtime: onnxruntime` row accepts, in registration order."""
    return [m.name for m in QUANT_METHODS.values() if m.onnxruntime is not None]


def register(cls: type[QuantMethod]) -> type[QuantMethod]:
    if cls.name in QUANT_METHODS:
        raise ValueError(f"quantization method {cls.name!r} is registered twice")
    if cls.onnxruntime is not None and cls.onnxruntime not in ORT_QUANTIZATIONS:
        raise ValueError(f"quantization method {cls.name!r}: onnxruntime {cls.onnxruntime!r} is not one of "
                         f"{', '.join(ORT_QUANTIZATIONS)}")
    QUANT_METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> QuantMethod:
    if name not in QUANT_METHODS:
        raise OptforgeError(f"unknown quantization method {name!r} (known: {', '.join(QUANT_METHODS)})")
    return QUANT_METHODS[name]


def option_fields() -> dict[str, object]:
    """Every parameter any method declares: name -> its pydantic FieldInfo (one type per name)."""
    fields: dict[str, object] = {}
    for m in QUANT_METHODS.values():
        for fname, info in m.params.model_fields.items():
            if fname in fields and fields[fname].annotation != info.annotation:
                raise TypeError(f"quantization parameter {fname!r} has two types across methods")
            fields.setdefault(fname, info)
    return fields


# --------------------------------------------------------------------------- shared by the methods


def _encoder_linears(model):
    """The Linears a method quantizes: those of `model.encoder`. A classifier's encoder is its base model
    (the head stays float); a causal LM is handed over as `QuantScope(lm)`, so every projection and the LM
    head are in scope."""
    from torch import nn

    return [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]


class QuantScope:
    """What a causal LM is quantized as: `encoder` is the whole model (optforge.lm)."""

    def __init__(self, module):
        self.encoder = module


def _torch_dynamic(model, qconfig, dtype) -> dict:
    """PyTorch eager `quantize_dynamic` of the encoder's Linears (fbgemm/onednn kernels, CPU)."""
    import warnings

    import torch
    from torch import nn

    before = _encoder_linears(model)
    with warnings.catch_warnings():  # torch.ao.quantization warns it is deprecated on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
        torch.ao.quantization.quantize_dynamic(model.encoder, {nn.Linear: qconfig}, dtype=dtype, inplace=True)
    after = [m for m in model.encoder.modules() if type(m) is nn.Linear]
    return {"quantized": len(before) - len(after), "skipped": len(after)}


def _torchao(model, config, accepts=lambda linear: True) -> dict:
    """torchao `quantize_` over the encoder's Linears that `accepts` takes; a Linear left alone counts as
    skipped."""
    from torch import nn
    from torchao.quantization import quantize_
    from torchao.utils import TorchAOBaseTensor

    before = _encoder_linears(model)
    inside = {id(m) for m in before if accepts(m)}  # the encoder's (base model's) Linears, whatever their names
    quantize_(model.encoder, config, filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and id(mod) in inside)
    done = sum(1 for m in before if isinstance(m.weight, TorchAOBaseTensor))
    return {"quantized": done, "skipped": len(before) - done}


# --------------------------------------------------------------------------- the methods


@register
class TorchInt8Dynamic(QuantMethod):
    """PyTorch's eager dynamic int8 with `per_channel_dynamic_qconfig` (a weight scale per output channel;
    activations quantized per tensor at run time). Per-channel rather than the default per-tensor weights:
    on MiniLM-L6 the max logit error halves (7.9 -> 3.8 on logits of scale 16) at the same speed."""

    name = "torch-int8-dynamic"
    devices = ("cpu",)
    precisions = {"cpu": ("fp32",)}
    format = "torch-int8-dynamic"
    compute_precision = "int8"
    summary = "PyTorch dynamic int8 (CPU)"
    onnxruntime = "int8-dynamic"

    def precision_reason(self, precision, device, allowed):
        return f"torch-int8-dynamic computes in fp32; got precision {precision} (use fp32)"

    def apply(self, model, params, device):
        import torch

        return _torch_dynamic(model, torch.ao.quantization.per_channel_dynamic_qconfig, torch.qint8)


@register
class TorchFp16Dynamic(QuantMethod):
    """PyTorch's eager dynamic fp16: fp16 weights packed for fbgemm's fp16 GEMM, fp32 activations and
    accumulation. Halves the weights with almost no accuracy cost; a CPU without fast fp16 gains little."""

    name = "torch-fp16-dynamic"
    devices = ("cpu",)
    precisions = {"cpu": ("fp32",)}
    format = "torch-int8-dynamic"  # the same packed-params save/load path as torch-int8-dynamic
    summary = "PyTorch dynamic fp16 weights (CPU)"

    def apply(self, model, params, device):
        import torch

        return _torch_dynamic(model, torch.ao.quantization.float16_dynamic_qconfig, torch.float16)


@register
class Int8Dynamic(QuantMethod):
    """torchao Int8DynamicActivationInt8WeightConfig: per-row int8 weights, per-token int8 activations."""

    name = "int8-dynamic"
    compute_precision = "int8"
    summary = "torchao int8 dynamic activations, int8 weights"
    onnxruntime = "int8-dynamic"

    def apply(self, model, params, device):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return _torchao(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))


@register
class Int8WeightOnly(QuantMethod):
    """torchao Int8WeightOnlyConfig: per-row int8 weights, float activations."""

    name = "int8-weight-only"
    summary = "torchao int8 weight-only"

    def apply(self, model, params, device):
        from torchao.quantization import Int8WeightOnlyConfig

        return _torchao(model, Int8WeightOnlyConfig(set_inductor_config=False))


class GroupSize(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    group_size: int = Field(128, description="weights per quantization group")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be one of 32, 64, 128, 256, got {v}")
        return v


@register
class Int4WeightOnly(QuantMethod):
    """torchao int4 weight-only with a scale per `group_size` weights.
    CPU: torchao.prototype PrototypeInt4WeightOnlyConfig -> Int4OpaqueTensor, packed for
    aten._weight_int4pack_mm_for_cpu (torchao 0.18 moved the CPU layout to the prototype namespace; the
    stable Int4WeightOnlyConfig's PLAIN format needs the CUDA-only `mslk` kernels); group_size 32/64/128,
    out_features % 16 == 0. CUDA: Int4WeightOnlyConfig(tile_packed_to_4d) (tinygemm), bf16 only. A Linear
    whose in_features is not a multiple of group_size stays float (torchao skips it; counted as skipped)."""

    name = "int4-weight-only"
    params = GroupSize
    precisions = {"cuda": ("bf16",)}
    summary = "torchao int4 weight-only (group_size)"

    def precision_reason(self, precision, device, allowed):
        return f"int4-weight-only on CUDA (tinygemm) computes in bf16; got precision {precision} (use bf16)"

    def accepts(self, linear, params, device):
        # the CPU packing (_convert_weight_to_int4pack_cpu) raises on out_features % 16 (a GPT-2 vocabulary
        # of 50257 in the LM head); both layouts need whole groups along in_features
        return linear.in_features % params.group_size == 0 and (device != "cpu" or linear.out_features % 16 == 0)

    def apply(self, model, params, device):
        def accepts(linear):  # a causal LM's head of 50257 outputs stays float; a classifier's misfit still fails
            return not isinstance(model, QuantScope) or self.accepts(linear, params, device)

        if device == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            if params.group_size not in (32, 64, 128):
                raise StageFailure(f"int4-weight-only on CPU supports group_size 32, 64 or 128, got {params.group_size}")
            return _torchao(model, PrototypeInt4WeightOnlyConfig(group_size=params.group_size,
                                                                 set_inductor_config=False), accepts)
        from torchao.quantization import Int4WeightOnlyConfig

        return _torchao(model, Int4WeightOnlyConfig(group_size=params.group_size,
                                                    int4_packing_format="tile_packed_to_4d",
                                                    set_inductor_config=False), accepts)


@register
class Float8(QuantMethod):
    """torchao Float8DynamicActivationFloat8WeightConfig: CUDA with compute capability >= 8.9."""

    name = "float8"
    devices = ("cuda",)
    compute_precision = "fp8"
    summary = "torchao float8 dynamic activations and weights (sm >= 8.9)"

    def check(self, precision, device):
        import torch

        cap = torch.cuda.get_device_capability() if device == "cuda" and torch.cuda.is_available() else None
        if cap is None or cap < (8, 9):
            where = f"compute capability {cap[0]}.{cap[1]}" if cap else device
            raise StageFailure(f"float8 needs a CUDA GPU with compute capability >= 8.9 (this: {where})")

    def apply(self, model, params, device):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        return _torchao(model, Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False))
