"""Model artifacts: how each kind is saved and loaded. Stages *make* artifacts; everything that *loads*
one to use it (evaluate, benchmark, serve, export) goes through `load_runnable`, the one door.

An artifact is a directory with `optforge_model.json` whose "format" names its kind:

  format               module                        written by
  float                optforge.artifacts.float      teacher, student, distill, prune (modeling.save_classifier)
  torch-int8-dynamic   optforge.artifacts.quantized  quantize (PyTorch packed params: torch-*-dynamic methods)
  torchao              optforge.artifacts.quantized  quantize (torchao tensor subclasses)
  aoti                 optforge.artifacts.compiled   compile (AOTInductor package)
  compiled             optforge.artifacts.compiled   compile (torch.compile + Inductor cache artifacts)
  onnx                 optforge.artifacts.onnx       onnxruntime (an ONNX graph ONNX Runtime runs, fp32 or int8)
  lm-float/-quantized/-compiled  optforge.artifacts.lm  the causal-LM stages (lm_*): an LMRunnable

Each module has `load(artifact_dir, device, precision) -> Runnable`. Importing this package imports no
torch; the format's module is imported when an artifact of that format is loaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from optforge.errors import OptforgeError

FORMATS: dict[str, str] = {  # format -> module with `load`
    "float": "optforge.artifacts.float",
    "torch-int8-dynamic": "optforge.artifacts.quantized",
    "torchao": "optforge.artifacts.quantized",
    "aoti": "optforge.artifacts.compiled",
    "compiled": "optforge.artifacts.compiled",
    "onnx": "optforge.artifacts.onnx",
    # causal LMs (task: causal-lm): an LMRunnable (generate, prefill, logits) instead of a classifier's Runnable
    "lm-float": "optforge.artifacts.lm",
    "lm-quantized": "optforge.artifacts.lm",
    "lm-compiled": "optforge.artifacts.lm",
}


def load_runnable(artifact_dir, device: str, precision: str = "fp32", verify: bool = True):
    """The artifact at `artifact_dir` as a `optforge.artifacts.runnable.Runnable` on `device`. `precision`
    applies to float artifacts; quantized and compiled ones compute in the precision they were made for.

    `verify`: a cache entry's files are checked against its manifest (sha256 of every file) before any
    is read; a damaged one raises CacheError naming the file. A stage passes False: the engine hashed its
    inputs just before it ran (and a benchmark's load time must not include hashing). A directory outside
    any cache (no manifest.json, not under objects/) has nothing to be checked against."""
    from optforge.cache import is_entry_dir, verify_entry
    from optforge.modeling import read_meta

    if verify and is_entry_dir(artifact_dir):
        verify_entry(artifact_dir)
    meta = read_meta(artifact_dir)
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise OptforgeError(f"{artifact_dir}: unknown model format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    return importlib.import_module(FORMATS[fmt]).load(Path(artifact_dir), device, precision)


def compute_precision(meta: dict, precision: str) -> str:
    """The precision an artifact's matmuls run in, for picking the hardware peak: its quantization
    method's (int8, fp8) when it declares one, else the row's precision (weight-only methods dequantize)."""
    from optforge.methods.quantize import QUANT_METHODS

    if meta.get("compute_precision"):
        return str(meta["compute_precision"])
    method = QUANT_METHODS.get(str(meta.get("method", "")))
    return method.compute_precision_for(precision) if method is not None else precision
