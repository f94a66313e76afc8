"""quantize: a float model artifact -> a quantized, self-contained artifact, checked against the float model.

The method is a registered definition (optforge.methods.quantize: what it supports, how it applies, what
it saves, what it computes in); the artifact is written and read by optforge.artifacts.quantized. The
recipe's precision (fp32/bf16/fp16) is applied before quantizing. Deterministic "not here" failures (no
kernel for this device, dtype or shape) become StageFailure with a one-line reason, so the report shows
the row as failed; after quantizing, a forward at batch 1 and at the calibration batch size must succeed,
the logits are compared with the float model's on that calibration batch, and the saved artifact must
reload to bit-identical logits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from optforge.errors import StageFailure, kernel_failure
from optforge.recipe import QuantizeParams
from optforge.stages.base import RowStep, StageContext, StageKind

CALIBRATION_TEXTS = [
    "the movie was good", "a dull, lifeless and thoroughly boring plot", "great", "it was quite awful",
    "one of the most delightful films of the year, with a cast that clearly enjoys every scene",
    "not bad", "the actors really tried, but the story never comes together",
    "an utterly brilliant, moving and funny piece of work", "horrible", "i would not watch it again",
    "the second half drags on for far too long and the ending is predictable", "superb",
    "visually stunning but emotionally empty", "it is what it is", "a lovely little surprise",
    "the director's best work since his debut more than a decade ago, and a reminder of why we go to the movies",
]


def run(ctx: StageContext) -> dict:
    import torch

    from optforge import modeling, training
    from optforge.artifacts import quantized as artifact
    from optforge.methods.quantize import get_method

    params: QuantizeParams = ctx.params
    method = get_method(params.method)
    src = Path(ctx.inputs["model"])
    src_meta = modeling.read_meta(src)
    if src_meta.get("format") != "float":
        raise StageFailure(f"quantize needs a float model, got format {src_meta.get('format')!r}")
    method.check(params.precision, ctx.device)
    training.configure_threads()

    model, tokenizer, _ = modeling.load_classifier(src)
    dtype = modeling.PRECISION_DTYPES[params.precision]
    model = model.to(device=ctx.device, dtype=dtype).eval()
    shapes = artifact.linear_shapes(model)
    batch = calibration_batch(ctx, tokenizer, int(src_meta["max_length"]))
    with torch.inference_mode():
        reference = model(*batch).float()

    start = time.perf_counter()
    method_params = params.method_params()
    with kernel_failure(f"{params.method}: quantize"):
        counts = method.apply(model, method_params, ctx.device)
    quant_s = time.perf_counter() - start
    if counts["quantized"] == 0:
        raise StageFailure(f"{params.method}: no Linear layer could be quantized "
                           f"(shapes {sorted(set(map(tuple, shapes.values())))}, group_size {params.group_size})")
    logits = verify_forward(model, batch, params.method)

    meta = {k: v for k, v in src_meta.items() if k not in ("format", "precision")}
    meta.update({"format": method.format, "method": params.method,
                 "group_size": getattr(method_params, "group_size", None),
                 "precision": params.precision, "linear_shapes": shapes, "device": ctx.device,
                 "source": src_meta.get("source", "model") + f" + {params.method}"})
    weights, weights_format = artifact.save(model, ctx.out, meta["format"])
    meta.update({"weights": weights, "weights_format": weights_format})
    artifact.copy_side_files(src, ctx.out)
    (ctx.out / modeling.META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    total_s = time.perf_counter() - start

    reloaded = artifact.load(ctx.out, ctx.device, params.precision)
    with torch.inference_mode():
        reload_diff = (reloaded.fn(*batch).float() - logits).abs().max().item()
    if reload_diff != 0:  # a serialization bug, not an unsupported method: stop the build
        raise RuntimeError(f"quantized artifact does not reload bit-exactly (max diff {reload_diff})")

    diff = (logits - reference).abs()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    size_before = (src / modeling.WEIGHTS).stat().st_size
    size_after = (ctx.out / weights).stat().st_size
    metrics = {"method": params.method, "precision": params.precision, "format": meta["format"],
               "weights_format": weights_format, "time_s": total_s, "quantize_s": quant_s,
               "size_mb_before": size_before / 2**20, "size_mb_after": size_after / 2**20,
               "compression": size_before / size_after, "linears_quantized": counts["quantized"],
               "linears_skipped": counts["skipped"], "calibration_n": int(batch[0].shape[0]),
               "logit_max_abs_diff": diff.max().item(), "logit_mean_abs_diff": diff.mean().item(),
               "logit_scale": reference.abs().max().item(), "agreement": agreement}
    if params.method == "int4-weight-only" and ctx.device == "cpu" and params.precision == "fp32":
        metrics["notes"] = ["the CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) is a slow path for fp32 "
                            "activations (MiniLM-L6 batch 1: ~20x slower than fp32 eager); use precision bf16"]
    ctx.log(f"{ctx.name}: {params.method} {params.precision}, {counts['quantized']} Linear quantized "
            f"({counts['skipped']} kept float), {metrics['size_mb_before']:.1f} -> {metrics['size_mb_after']:.1f} MB, "
            f"max |dlogit| {metrics['logit_max_abs_diff']:.4f}, agreement {agreement:.3f}")
    return metrics


def _row_params(recipe, c) -> dict:
    step = next(q for q in recipe.quantize if q.name == c.quantize)
    return QuantizeParams.for_step(step, c.precision)


KIND = StageKind(kind="quantize", version="1", params_model=QuantizeParams, run=run, hardware_bound=True,
                 # a `runtime: onnxruntime` row quantizes in the onnxruntime stage (ONNX Runtime's quantization)
                 row=RowStep(order=10, measure=False,
                             applies=lambda recipe, c: c.quantize is not None and c.runtime == "torch",
                             params=_row_params))


def verify_forward(model, batch, method: str):
    """Logits of the calibration batch; StageFailure if a kernel rejects batch 1 or the full batch."""
    import torch

    input_ids, mask = batch
    with torch.inference_mode():
        with kernel_failure(f"{method}: forward at batch 1"):
            one = model(input_ids[:1], mask[:1]).float()
        with kernel_failure(f"{method}: forward at batch {input_ids.shape[0]}"):
            logits = model(input_ids, mask).float()
    if not torch.isfinite(logits).all() or not torch.isfinite(one).all():
        raise StageFailure(f"{method}: non-finite logits on the calibration batch")
    return logits


def calibration_batch(ctx: StageContext, tokenizer, max_length: int):
    """(input_ids, attention_mask) on the device: eval sentences when a data input is wired, else a fixed
    set of sentences of varied lengths (padding included, so masked positions are exercised)."""
    from optforge.tokens import pad_batch

    texts = list(CALIBRATION_TEXTS)
    if "data" in ctx.inputs:
        from optforge.stages.data import EVAL_FILE, read_examples

        texts = read_examples(Path(ctx.inputs["data"]) / EVAL_FILE)[0][:32] or texts
    texts = (texts * 2)[:32]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id or 0)
    return input_ids.to(ctx.device), mask.to(ctx.device)
