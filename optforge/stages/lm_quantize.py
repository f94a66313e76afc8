"""lm_quantize (a `quantize:<config>` stage of a causal-lm recipe): a float LM -> a quantized LM artifact.

GPT-2 keeps its projections in transformers' Conv1D, which PyTorch's dynamic quantization and torchao's
filter (both match nn.Linear) silently skip, so every Conv1D is first converted to the equivalent nn.Linear
(`lm.model.conv1d_to_linear`). The registered method (optforge.methods.quantize) then quantizes every Linear
of the model, the LM head included (a shape the method's kernels do not take stays float: `accepts`). The
metrics count what was quantized and what was not (`modules_quantized`, `modules_skipped`,
`conv1d_converted`, `conv1d_left`): a method that quantized nothing is a StageFailure, never a silent no-op.
The logits on 64 eval tokens are compared with the float model's, and the saved artifact must reload to
bit-identical logits."""

from __future__ import annotations

import json
import time
from pathlib import Path

from optforge.errors import StageFailure, kernel_failure
from optforge.recipe import QuantizeParams
from optforge.stages.base import RowStep, StageContext, StageKind
from optforge.stages.quantize import _row_params

CALIBRATION_TOKENS = 64


def calibration_ids(tokenizer, data_dir, device):
    """[2, 32] ids from the start of the eval split's token stream (the same for every row)."""
    import torch

    from optforge.lm.perplexity import token_stream
    from optforge.lm.train import read_split
    from optforge.stages.data import EVAL_FILE

    stream = token_stream(tokenizer, read_split(data_dir, EVAL_FILE)[:200])
    stream = (stream * (1 + CALIBRATION_TOKENS // max(1, len(stream))))[:CALIBRATION_TOKENS]
    return torch.tensor(stream, dtype=torch.long, device=device).view(2, -1)


def run(ctx: StageContext) -> dict:
    import torch

    from optforge.artifacts import quantized as saved
    from optforge.artifacts.lm import QUANTIZED_FORMAT, load
    from optforge.lm import model as lm_model
    from optforge.methods.quantize import QuantScope, get_method
    from optforge.modeling import PRECISION_DTYPES
    from optforge import training

    params: QuantizeParams = ctx.params
    method = get_method(params.method)
    src = Path(ctx.inputs["model"])
    src_meta = lm_model.read_meta(src)
    if src_meta.get("format") != lm_model.FLOAT_FORMAT:
        raise StageFailure(f"quantize needs a float LM, got format {src_meta.get('format')!r}")
    method.check(params.precision, ctx.device)
    training.configure_threads()
    model, tokenizer, _ = lm_model.load_float(src)
    model = model.to(device=ctx.device, dtype=PRECISION_DTYPES[params.precision]).eval()
    ids = calibration_ids(tokenizer, ctx.inputs["data"], ctx.device)
    with torch.inference_mode():
        reference = model(ids).logits.float()

    start = time.perf_counter()
    converted = lm_model.conv1d_to_linear(model)
    method_params = params.method_params()
    with kernel_failure(f"{params.method}: quantize"):
        counts = method.apply(QuantScope(model), method_params, ctx.device)
    quant_s = time.perf_counter() - start
    left = lm_model.count_conv1d(model)
    if counts["quantized"] == 0:
        raise StageFailure(f"{params.method}: no projection could be quantized ({counts['skipped']} Linear kept "
                           f"float, {left} Conv1D left)")
    with torch.inference_mode(), kernel_failure(f"{params.method}: forward"):
        logits = model(ids).logits.float()
    if not torch.isfinite(logits).all():
        raise StageFailure(f"{params.method}: non-finite logits on the calibration tokens")

    meta = {k: v for k, v in src_meta.items() if k not in ("format", "precision")}
    meta.update({"format": QUANTIZED_FORMAT, "method": params.method,
                 "group_size": getattr(method_params, "group_size", None), "precision": params.precision,
                 "device": ctx.device, "modules_quantized": counts["quantized"], "modules_skipped": counts["skipped"],
                 "conv1d_converted": converted, "source": src_meta.get("source", "model") + f" + {params.method}"})
    weights, weights_format = saved.save(model, ctx.out, method.format)
    meta.update({"weights": weights, "weights_format": weights_format})
    lm_model.copy_side_files(src, ctx.out)
    (ctx.out / lm_model.META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    total_s = time.perf_counter() - start

    reloaded = load(ctx.out, ctx.device)
    with torch.inference_mode():
        reload_diff = (reloaded.model(ids).logits.float() - logits).abs().max().item()
    if reload_diff != 0:  # a serialization bug, not an unsupported method: stop the build
        raise RuntimeError(f"quantized LM artifact does not reload bit-exactly (max diff {reload_diff})")

    diff = (logits - reference).abs()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    size_before = (src / "model.safetensors").stat().st_size
    size_after = (ctx.out / weights).stat().st_size
    metrics = {"method": params.method, "precision": params.precision, "format": QUANTIZED_FORMAT,
               "weights_format": weights_format, "time_s": total_s, "quantize_s": quant_s,
               "modules_quantized": counts["quantized"], "modules_skipped": counts["skipped"],
               "conv1d_converted": converted, "conv1d_left": left,
               "size_mb_before": size_before / 2**20, "size_mb_after": size_after / 2**20,
               "logit_max_abs_diff": diff.max().item(), "logit_mean_abs_diff": diff.mean().item(),
               "next_token_agreement": agreement, "calibration_tokens": int(ids.numel())}
    ctx.log(f"{ctx.name}: {params.method} {params.precision}: {counts['quantized']} modules quantized, "
            f"{counts['skipped']} kept float ({converted} Conv1D converted), {metrics['size_mb_before']:.1f} -> "
            f"{metrics['size_mb_after']:.1f} MB, next-token agreement {agreement:.3f}")
    return metrics


KIND = StageKind(kind="lm_quantize", version="1", params_model=QuantizeParams, run=run, hardware_bound=True,
                 task="causal-lm",
                 row=RowStep(order=10, measure=False, applies=lambda recipe, c: c.quantize is not None,
                             params=_row_params, needs_data=True, stage="quantize"))
