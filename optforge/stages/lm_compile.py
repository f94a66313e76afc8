"""lm_compile (a `compile:<config>` stage of a causal-lm recipe): decoding under torch.compile with a static KV
cache (transformers' StaticCache: fixed-size key/value tensors updated in place, so each decode step has one
shape and is traced once).

The artifact is the input artifact's files (float or quantized) with "format": "lm-compiled", its
"base_format" and the torch.compile mode (optforge.artifacts.lm compiles it when it is loaded: no compiled
code is cached, so the artifact holds no code). This stage checks that it compiles here and that greedy
decoding of 8 tokens from the calibration prompt gives logits within the tolerance of the eager model's
(optforge.methods.compile.allowed_difference), and records the compile time (the first prefill + decode)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from optforge.errors import StageFailure, kernel_failure
from optforge.recipe import LMCompileParams
from optforge.stages.base import RowStep, StageContext, StageKind

VERIFY_TOKENS = 8


def run(ctx: StageContext) -> dict:
    from optforge import training
    from optforge.artifacts.lm import COMPILED_FORMAT, QUANTIZED_FORMAT, load
    from optforge.lm import model as lm_model
    from optforge.methods.compile import COMPILE_MODES, allowed_difference
    from optforge.stages.lm_quantize import calibration_ids

    params: LMCompileParams = ctx.params
    mode, note = COMPILE_MODES[params.mode].resolve(ctx.device)
    torch_mode = mode.torch_mode or ("reduce-overhead" if COMPILE_MODES[params.mode].cuda_graphs and
                                     ctx.device == "cuda" else "default")
    src = Path(ctx.inputs["model"])
    src_meta = lm_model.read_meta(src)
    if src_meta["format"] not in (lm_model.FLOAT_FORMAT, QUANTIZED_FORMAT):
        raise StageFailure(f"compile needs a float or quantized LM, got format {src_meta['format']!r}")
    training.configure_threads()
    for f in src.iterdir():
        if f.name in (lm_model.META, "manifest.json"):
            continue
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, ctx.out / f.name)
    meta = src_meta | {"format": COMPILED_FORMAT, "base_format": src_meta["format"], "compile_mode": torch_mode,
                       "precision": src_meta.get("precision") if src_meta["format"] == QUANTIZED_FORMAT
                       else params.precision}
    (ctx.out / lm_model.META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    eager = load(src, ctx.device, params.precision)
    ids = calibration_ids(eager.tokenizer, ctx.inputs["data"], ctx.device)[:1, :16]
    tokens_eager, logits_eager = eager.generate(ids, VERIFY_TOKENS, keep_logits=True)
    del eager
    compiled = load(ctx.out, ctx.device, params.precision)
    start = time.perf_counter()
    with kernel_failure(f"compile ({torch_mode})"):
        tokens, logits = compiled.generate(ids, VERIFY_TOKENS, keep_logits=True)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled.generate(ids, VERIFY_TOKENS)
    second_s = time.perf_counter() - start
    diff = (logits - logits_eager).abs().max().item()
    scale = logits_eager.abs().max().item()
    fmt = "float" if src_meta["format"] == lm_model.FLOAT_FORMAT else "quantized"
    allowed = allowed_difference(fmt, compiled.precision, scale, ctx.input_metrics.get("model", {}).get(
        "logit_max_abs_diff"))
    if not diff <= allowed:  # also catches NaN
        raise StageFailure(f"compiled decoding differs from eager: max |dlogit| {diff:.4g} > {allowed:.4g}")
    metrics = {"mode": params.mode, "torch_mode": torch_mode, "precision": compiled.precision, "time_s": compile_s,
               "compile_s": compile_s, "second_call_s": second_s, "static_cache": True,
               "logit_max_abs_diff": diff, "logit_diff_allowed": allowed, "logit_scale": scale,
               "tokens_match": bool((tokens == tokens_eager).all()), "verify_tokens": VERIFY_TOKENS}
    if note:
        metrics["notes"] = [note]
    ctx.log(f"{ctx.name}: compiled ({torch_mode}, static KV cache) in {compile_s:.1f} s; {VERIFY_TOKENS} greedy "
            f"tokens, max |dlogit| vs eager {diff:.2e} (allowed {allowed:.2e})")
    return metrics


KIND = StageKind(kind="lm_compile", version="1", params_model=LMCompileParams, run=run, hardware_bound=True,
                 task="causal-lm",
                 row=RowStep(order=20, measure=False, applies=lambda recipe, c: c.compile != "none",
                             params=LMCompileParams.for_row, needs_data=True, stage="compile"))
