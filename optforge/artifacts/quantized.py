"""Quantized artifacts (formats "torch-int8-dynamic" and "torchao"), made by the quantize stage.

Files (self-contained: config.json, head.json and tokenizer/ copied from the float input):
  torchao + a subclass torchao can flatten (Int8Tensor, Float8Tensor...): model.safetensors written with
      torchao.prototype.safetensors.flatten_tensor_state_dict (tensor data + JSON metadata, no pickle);
  otherwise (Int4OpaqueTensor, PyTorch packed params): model.pt = torch.save(state_dict), read back with
      torch.load(weights_only=True) - torchao registers its subclasses as safe globals, and PyTorch's
      weights-only unpickler accepts the dynamic-int8 packed params (tests/stages/test_quantize.py checks both).
optforge_model.json: {"format", "method", "group_size", "precision", "weights": file name,
"weights_format": "safetensors" | "torch-save", "linear_shapes": {name: [out, in]}, "device", ...}.

Loading rebuilds the float skeleton from config.json + the saved Linear shapes (structurally pruned models
differ per layer), quantizes it with the same registered method (optforge.methods.quantize) so every module
has the right type, then loads the saved state over it (`assign=True`): no quantization is recomputed, the
loaded weights are the saved bits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from optforge.errors import OptforgeError, StageFailure, kernel_failure

WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_PICKLE = "model.pt"


def save(model, out: Path, fmt: str) -> tuple[str, str]:
    """Write the quantized state dict; returns (file name, "safetensors" | "torch-save")."""
    import torch

    state = model.state_dict()
    if fmt == "torchao":
        try:
            from safetensors.torch import save_file
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

            tensors, metadata = flatten_tensor_state_dict({k: v.detach() for k, v in state.items()})
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_SAFETENSORS),
                      metadata=metadata)
            return WEIGHTS_SAFETENSORS, "safetensors"
        except (ValueError, ImportError):  # a subclass torchao cannot flatten (e.g. Int4OpaqueTensor)
            (out / WEIGHTS_SAFETENSORS).unlink(missing_ok=True)
    torch.save(state, out / WEIGHTS_PICKLE)
    return WEIGHTS_PICKLE, "torch-save"


def load_state(artifact_dir: Path, meta: dict, device: str) -> dict:
    import torch

    path = artifact_dir / meta["weights"]
    if meta["weights_format"] == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        state, leftover = unflatten_tensor_state_dict(load_file(str(path), device=device), metadata)
        if leftover:
            raise OptforgeError(f"{path}: unexpected tensors {sorted(leftover)[:5]}")
        return state
    import warnings

    with warnings.catch_warnings():  # PyTorch's packed params still unpickle through TypedStorage
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        return torch.load(path, map_location=device, weights_only=True)


def copy_side_files(src: Path, out: Path) -> None:
    """The float artifact's architecture files and tokenizer, so `out` never points into `src`."""
    from optforge import modeling

    for name in (modeling.ENCODER_CONFIG, modeling.HEAD):
        shutil.copy2(src / name, out / name)
    shutil.copytree(src / modeling.TOKENIZER_DIR, out / modeling.TOKENIZER_DIR)


def linear_shapes(model) -> dict:
    """{module name: [out_features, in_features]} of every nn.Linear (the float skeleton's shapes)."""
    from torch import nn

    return {n: [m.out_features, m.in_features] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def float_skeleton(artifact_dir: Path, meta: dict):
    """An fp32 classifier (TextClassifier or HFSeqClassifier) with the saved architecture (Linear shapes
    included) and throwaway weights."""
    import torch

    from optforge import modeling

    model = modeling.classifier_skeleton(artifact_dir)
    shapes = {}
    for name, (out_f, in_f) in meta["linear_shapes"].items():
        shapes[f"{name}.weight"] = torch.empty(out_f, in_f, device="meta")
        shapes[f"{name}.bias"] = torch.empty(out_f, device="meta")
    modeling.fit_to_state(model, shapes)
    return model.eval()


def method_params(meta: dict):
    """The registered method of a quantized artifact and its parameters, from optforge_model.json."""
    from optforge.methods.quantize import get_method

    method = get_method(meta["method"])
    given = {f: meta[f] for f in method.params.model_fields if meta.get(f) is not None}
    return method, method.params.model_validate(given)


def load_module(artifact_dir, device: str, precision: str | None = None):
    """(quantized TextClassifier on `device`, tokenizer, meta)."""
    from transformers import AutoTokenizer

    from optforge import modeling

    artifact_dir = Path(artifact_dir)
    meta = modeling.read_meta(artifact_dir)
    if precision is not None and precision != meta["precision"]:
        raise OptforgeError(f"{artifact_dir}: quantized for precision {meta['precision']}, asked for {precision}")
    method, params = method_params(meta)
    method.check(meta["precision"], device)
    if meta.get("device", device) != device:
        raise StageFailure(f"{meta['method']} artifact was packed for {meta['device']}, not {device}")
    model = float_skeleton(artifact_dir, meta).to(device=device, dtype=modeling.PRECISION_DTYPES[meta["precision"]])
    with kernel_failure(f"{meta['method']}: quantize"):
        method.apply(model, params, device)
    state = load_state(artifact_dir, meta, device)
    model.load_state_dict(state, strict=True, assign=True)
    tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir / modeling.TOKENIZER_DIR))
    return model.eval(), tokenizer, meta


def load(artifact_dir, device: str, precision: str = "fp32"):
    """The artifact's own precision wins over `precision`: its weights were quantized for that dtype."""
    from optforge.artifacts.runnable import Runnable

    model, tokenizer, meta = load_module(artifact_dir, device)
    return Runnable(model, tokenizer, meta, device, precision=meta["precision"], artifact_dir=artifact_dir,
                    description=f"{meta['method']} {meta['precision']}")
