"""onnxruntime: a float model artifact -> an ONNX Runtime artifact (format "onnx", optforge.artifacts.onnx),
for the rows that say `runtime: onnxruntime`. CPU only.

  1. export   the float model to ONNX (opset 17, TorchScript exporter, dynamic batch and sequence axes);
  2. quantize when the row's quantize entry asks (methods.quantize: `onnxruntime`): ONNX Runtime dynamic
              int8 (onnxruntime.quantization.quantize_dynamic, per-channel int8 weights), after checking the
              exported fp32 graph against PyTorch, so an export bug is caught at fp32 tolerance;
  3. optimize offline with ONNX Runtime's graph optimizations (ORT_ENABLE_EXTENDED), saved as model.onnx:
              loading then optimizes nothing;
  4. verify   the saved artifact, loaded as evaluate/benchmark/serve load it: fp32 logits within the compile
              stage's tolerance of PyTorch's (methods.compile.allowed_difference) at batch 1 and 32, short
              and max_length sequences, and on the calibration batch; int8 logits finite everywhere and the
              same argmax as PyTorch on at least MIN_AGREEMENT of the calibration batch.

The row's `quantize` step does not run for such rows (ONNX Runtime quantizes the graph itself); this step
sits between quantize and compile in row order, and compile cannot be combined with it (recipe check).
Static int8 (QDQ with calibration) was tried and left out: on a MiniLM student it agreed with the float
model less often than dynamic int8 (0.90 vs 0.95) and was not faster (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from optforge.errors import StageFailure, kernel_failure, one_line
from optforge.fingerprint import library_versions
from optforge.recipe import OnnxRuntimeParams
from optforge.stages.base import RowStep, StageContext, StageKind

MIN_AGREEMENT = 0.9  # int8: share of the calibration batch whose argmax must equal PyTorch's float model
CHECK_BATCH = 32  # largest batch the verification runs


def run(ctx: StageContext) -> dict:
    import torch

    from optforge import modeling, training
    from optforge.artifacts import onnx as artifact
    from optforge.artifacts.quantized import copy_side_files, linear_shapes
    from optforge.artifacts.runnable import count_params
    from optforge.methods.compile import allowed_difference
    from optforge.stages.compile import verify
    from optforge.stages.quantize import calibration_batch

    params: OnnxRuntimeParams = ctx.params
    artifact.cpu_only(ctx.device)
    src = Path(ctx.inputs["model"])
    src_meta = modeling.read_meta(src)
    if src_meta.get("format") != "float":
        raise StageFailure(f"onnxruntime needs a float model, got format {src_meta.get('format')!r}")
    threads = training.configure_threads()
    model, tokenizer, _ = modeling.load_classifier(src)
    model = model.float().eval()
    max_length = int(src_meta["max_length"])
    batch = calibration_batch(ctx, tokenizer, max_length)
    with torch.inference_mode():
        reference = model(*batch).float()

    start = time.perf_counter()
    metrics: dict = {"precision": params.precision, "quantization": params.quantization, "opset": artifact.OPSET,
                     "exporter": artifact.EXPORTER, "graph_optimization": artifact.OFFLINE_LEVEL,
                     "threads": threads, "calibration_n": int(batch[0].shape[0]), "quantize_s": None}
    with tempfile.TemporaryDirectory(prefix="optforge-onnx-") as tmp:
        graph = Path(tmp) / "exported.onnx"
        t0 = time.perf_counter()
        with kernel_failure("onnx export"):
            artifact.export(model, tokenizer, graph)
        metrics["export_s"] = time.perf_counter() - t0
        metrics["nodes_exported"] = sum(artifact.op_counts(graph).values())
        if params.quantization is not None:
            metrics["export_max_abs_diff"] = check_export(graph, model, tokenizer, CHECK_BATCH, max_length, threads)
            t0 = time.perf_counter()
            with kernel_failure(f"onnxruntime {params.quantization}"):
                artifact.quantize_dynamic(graph, Path(tmp) / "quantized.onnx")
            metrics["quantize_s"] = time.perf_counter() - t0
            graph = Path(tmp) / "quantized.onnx"
        t0 = time.perf_counter()
        try:
            artifact.optimize(graph, ctx.out / artifact.MODEL)
        except artifact.errors() as e:
            raise StageFailure(f"onnxruntime graph optimization: {one_line(e)}") from e
        metrics["optimize_s"] = time.perf_counter() - t0

    total, nonzero = count_params(model)
    meta = {k: v for k, v in src_meta.items() if k not in ("format", "precision", "weights", "weights_format")}
    meta.update({"format": "onnx", "precision": params.precision, "quantization": params.quantization,
                 "opset": artifact.OPSET, "exporter": artifact.EXPORTER, "graph_optimization": artifact.OFFLINE_LEVEL,
                 "params": total, "nonzero_params": nonzero, "linear_shapes": linear_shapes(model), "device": "cpu",
                 "onnxruntime": library_versions(("onnxruntime",))["onnxruntime"],
                 "source": src_meta.get("source", "model") + " + onnxruntime"
                 + (f" {params.quantization}" if params.quantization else "")})
    if params.quantization is not None:
        meta.update({"method": f"onnxruntime-{params.quantization}", "compute_precision": "int8"})
    copy_side_files(src, ctx.out)
    (ctx.out / modeling.META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    metrics["time_s"] = time.perf_counter() - start

    runnable = artifact.load(ctx.out, "cpu")  # as evaluate, benchmark and serve will load it
    what = f"onnxruntime {params.quantization or params.precision} model"
    shape_diff, scale = verify(runnable.fn, model, tokenizer, "cpu", CHECK_BATCH, max_length, what=what)
    logits = runnable.forward({"input_ids": batch[0], "attention_mask": batch[1]})
    if not torch.isfinite(logits).all():
        raise StageFailure(f"{what} gives non-finite logits on the calibration batch")
    calib_diff = (logits - reference).abs()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    scale = max(scale, reference.abs().max().item())
    metrics.update({"logit_max_abs_diff": max(shape_diff, calib_diff.max().item()),
                    "logit_mean_abs_diff": calib_diff.mean().item(), "logit_scale": scale, "agreement": agreement})
    if params.quantization is None:
        allowed = allowed_difference("float", "fp32", scale, None)
        metrics["logit_diff_allowed"] = allowed
        if metrics["logit_max_abs_diff"] > allowed:
            raise StageFailure(f"{what} logits differ from PyTorch by {metrics['logit_max_abs_diff']:.3g} "
                               f"(> {allowed:.3g} allowed)")
    elif agreement < MIN_AGREEMENT:
        raise StageFailure(f"{what} agrees with the float model on {agreement:.0%} of the calibration batch "
                           f"(< {MIN_AGREEMENT:.0%})")

    ops = artifact.op_counts(ctx.out / artifact.MODEL)
    size = (ctx.out / artifact.MODEL).stat().st_size
    metrics.update({"nodes": sum(ops.values()), "op_counts": ops,
                    "fused_ops": {op.split(":", 1)[1]: n for op, n in ops.items() if op.startswith("com.microsoft:")},
                    "file_mb": size / 2**20, "size_mb_before": (src / modeling.WEIGHTS).stat().st_size / 2**20})
    ctx.log(f"{ctx.name}: {what}, opset {artifact.OPSET}, {metrics['nodes_exported']} -> {metrics['nodes']} nodes, "
            f"{metrics['file_mb']:.1f} MB, max |dlogit| vs PyTorch {metrics['logit_max_abs_diff']:.3g}, "
            f"agreement {agreement:.3f}")
    return metrics


def check_export(graph: Path, model, tokenizer, max_batch: int, max_length: int, threads: int) -> float:
    """The max |logit| difference between an exported (not yet optimized) fp32 graph run by ONNX Runtime and
    the PyTorch model, over the compile stage's check shapes; StageFailure above the fp32 tolerance."""
    from optforge.artifacts import onnx as artifact
    from optforge.methods.compile import allowed_difference
    from optforge.stages.compile import verify

    forward = artifact.OrtForward(artifact.session(graph, threads, optimize_at_load=True))
    diff, scale = verify(forward, model, tokenizer, "cpu", max_batch, max_length, what="exported ONNX model")
    allowed = allowed_difference("float", "fp32", scale, None)
    if diff > allowed:
        raise StageFailure(f"exported ONNX logits differ from PyTorch by {diff:.3g} (> {allowed:.3g} allowed)")
    return diff


KIND = StageKind(kind="onnxruntime", version="1", params_model=OnnxRuntimeParams, run=run, hardware_bound=True,
                 libraries=("onnxruntime", "onnx"),
                 row=RowStep(order=15, measure=False, applies=lambda recipe, c: c.runtime == "onnxruntime",
                             params=lambda recipe, c: OnnxRuntimeParams.for_row(recipe, c), needs_data=True))
