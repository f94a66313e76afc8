"""compile: a float or quantized model artifact -> a compiled artifact a cached build reuses without
compiling again. Two paths, tried in this order; the metrics say which one was taken and why:

  "aoti"      torch.export.export with a dynamic batch dim (1..max_batch) and sequence dim (2..max_length),
              then AOTInductor (`torch._inductor.aoti_compile_and_package`) -> model.pt2: generated C++/CUDA
              code compiled into a shared library plus the weights. Loading (`aoti_load_package`) runs no
              compiler at all. Works for float models and torchao tensor-subclass quantization.
  "compiled"  when export/AOTI fails (PyTorch's dynamic-int8 Linear keeps its weights in a TorchScript
              packed-params object that export cannot trace), on CUDA (AOTInductor crashed there), and for
              CUDA graphs: torch.compile(dynamic=True),
              warmed up on representative shapes, and Inductor's cache artifacts
              (`torch.compiler.save_cache_artifacts()`) saved as inductor_cache.bin next to a copy of the
              eager artifact (eager/). Loading hot-loads the artifacts, then torch.compile again: Dynamo
              still traces (seconds), but every Inductor/AOTAutograd graph is a cache hit - no code generation,
              no C++ compile. Tests check this with torch._dynamo counters in a fresh process.

Modes: "default"; "max-autotune" passes inductor_configs {"max_autotune": True} (on CPU: the C++ GEMM
template with autotuning); "reduce-overhead" means CUDA graphs: on CUDA the code compiles as "default" and
the loader captures one CUDA graph per (batch, length) bucket over it (optforge.cudagraphs; faster to
replay than torch.compile's own reduce-overhead graph trees), on CPU it compiles as "default" and the
metrics say so. Before the stage returns, the artifact is reloaded from disk and its logits are compared
with the eager model's at batch 1 and max(32) batch, at sequence lengths 3, a padded middle one and max_length.

Artifact: model.pt2 (aoti) or eager/ + inductor_cache.bin (compiled); config.json/head.json (shapes, for
FLOP counting) and tokenizer/ copied; optforge_model.json {"format": "aoti"|"compiled", "mode",
"precision", "device", "max_batch", "max_length", "params", "nonzero_params", "inner_format", ...}.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path

from optforge.errors import OptforgeError, StageFailure, one_line
from optforge.recipe import CompileParams
from optforge.stages.base import StageContext, StageKind

PACKAGE = "model.pt2"
CACHE_BLOB = "inductor_cache.bin"
EAGER_DIR = "eager"
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


def run(ctx: StageContext) -> dict:
    import torch

    from optforge import modeling, training

    params: CompileParams = ctx.params
    src = Path(ctx.inputs["model"])
    src_meta = modeling.read_meta(src)
    if src_meta.get("format") in ("aoti", "compiled"):
        raise StageFailure(f"compile needs a float or quantized model, got format {src_meta['format']!r}")
    training.configure_threads()
    model, tokenizer, eager_meta = load_eager(src, ctx.device, params.precision)
    precision = eager_meta["precision"]
    notes = []
    mode = params.mode
    if mode == "reduce-overhead" and ctx.device != "cuda":
        notes.append("reduce-overhead is CUDA graphs; on cpu compiled as default")
        mode = "default"
    max_batch = max(params.max_batch, 2)
    max_length = min(params.max_length, int(src_meta["max_length"]))

    # CUDA graphs: Inductor code compiled as "default", then captured per shape bucket at load time
    # (optforge.cudagraphs). Saved as Inductor cache artifacts: a captured graph cannot be serialised.
    cuda_graphs = mode == "reduce-overhead"
    if cuda_graphs:
        mode = "default"
    start = time.perf_counter()
    path, fallback_reason, passes = "aoti", None, 0
    if cuda_graphs:
        path, fallback_reason = "compiled", "CUDA graphs are captured at load time over torch.compile code"
    elif ctx.device == "cuda":
        # Measured on an H200 (torch 2.11, CUDA 13): AOTInductor crashed (SIGSEGV) on every model we gave
        # it, after ~2 minutes of compiling; the child process contained it, but the time was lost.
        path, fallback_reason = "compiled", "on CUDA, torch.compile cache artifacts (AOTInductor crashed here)"
    else:
        failure = aoti_in_child(src, ctx.out / PACKAGE, ctx.device, precision, max_batch, max_length, mode,
                                quantized=src_meta["format"] != "float")
        if failure is not None:  # any export/AOTI failure or crash sends us to the fallback path
            path, fallback_reason = "compiled", failure
            (ctx.out / PACKAGE).unlink(missing_ok=True)
            ctx.log(f"{ctx.name}: {fallback_reason}; falling back to torch.compile cache artifacts")
    if path == "compiled":
        compiled, passes = inductor_compile(model, tokenizer, ctx.out / CACHE_BLOB, ctx.device, max_batch,
                                            max_length, mode)
        shutil.copytree(src, ctx.out / EAGER_DIR)
    compile_s = time.perf_counter() - start

    total, nonzero = _param_count(model)
    meta = {k: v for k, v in src_meta.items() if k not in ("weights", "weights_format")}
    meta.update({"format": path, "mode": params.mode, "compiled_mode": mode, "cuda_graphs": cuda_graphs,
                 "precision": precision,
                 "device": ctx.device, "max_batch": max_batch, "max_length": max_length,
                 "inner_format": src_meta["format"], "params": total, "nonzero_params": nonzero,
                 "warmup_shapes": warmup_shapes(max_batch, max_length), "warmup_passes": passes,
                 "source": src_meta.get("source", "model") + f" + compile {params.mode} ({path})"})
    if "linear_shapes" not in meta:
        from optforge.stages.quantize import linear_shapes

        meta["linear_shapes"] = linear_shapes(model)
    for name in (modeling.ENCODER_CONFIG, modeling.HEAD):
        shutil.copy2(src / name, ctx.out / name)
    shutil.copytree(src / modeling.TOKENIZER_DIR, ctx.out / modeling.TOKENIZER_DIR)
    (ctx.out / modeling.META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    start = time.perf_counter()
    loaded = load_compiled(ctx.out, ctx.device, precision) if path == "aoti" else None
    load_s = time.perf_counter() - start
    fn = loaded.fn if loaded is not None else compiled
    if cuda_graphs:
        fn = graphed(compiled.fn, tokenizer, ctx.device, max_batch, max_length)
    max_diff, scale = verify(fn, model, tokenizer, ctx.device, max_batch, max_length)
    allowed = allowed_difference(src_meta["format"], precision, scale,
                                 ctx.input_metrics.get("model", {}).get("logit_max_abs_diff"))
    if max_diff > allowed:
        raise StageFailure(f"compiled ({path}) logits differ from eager by {max_diff:.3g} (> {allowed:.3g} allowed)")
    metrics = {"time_s": compile_s, "compile_s": compile_s, "path": path, "mode": params.mode,
               "compiled_mode": mode, "cuda_graphs": cuda_graphs, "precision": precision,
               "inner_format": src_meta["format"],
               "logit_max_abs_diff": max_diff, "logit_diff_allowed": allowed, "logit_scale": scale,
               "max_batch": max_batch,
               "max_length": max_length, "artifact_mb": _artifact_bytes(ctx.out) / 2**20}
    if loaded is not None:
        metrics["load_s"] = load_s
    if fallback_reason:
        metrics["fallback_reason"] = fallback_reason
    if notes:
        metrics["notes"] = notes
    ctx.log(f"{ctx.name}: {path} in {compile_s:.1f}s, max |dlogit| vs eager {max_diff:.2g}"
            + (f" ({fallback_reason})" if fallback_reason else ""))
    return metrics


KIND = StageKind(kind="compile", version="2", params_model=CompileParams, run=run, hardware_bound=True)


def allowed_difference(fmt: str, precision: str, scale: float, quant_error) -> float:
    base = TOLERANCE[precision] * max(scale, 1.0)
    if fmt == "float":
        return base
    floor = QUANTIZED_TOLERANCE * max(scale, 1.0)
    return floor if quant_error is None else max(floor, base + 2 * float(quant_error))


# --------------------------------------------------------------------------- eager models


def load_eager(artifact_dir: Path, device: str, precision: str):
    """(nn.Module on device in eval mode, tokenizer, meta) for a float or quantized artifact. A float model
    is cast to `precision`; a quantized one keeps the precision it was quantized for (a mismatch fails)."""
    from optforge import modeling

    meta = modeling.read_meta(artifact_dir)
    if meta["format"] == "float":
        model, tokenizer, meta = modeling.load_classifier(artifact_dir)
        model = model.to(device=device, dtype=modeling.PRECISION_DTYPES[precision]).eval()
        return model, tokenizer, dict(meta, precision=precision)
    if meta["format"] in ("torch-int8-dynamic", "torchao"):
        from optforge.stages.quantize import load_quantized_module

        if meta["precision"] != precision:
            raise StageFailure(f"the model was quantized for {meta['precision']}, compile asks for {precision}")
        return load_quantized_module(artifact_dir, device)
    raise OptforgeError(f"{artifact_dir}: cannot compile a {meta['format']!r} artifact")


def example_inputs(tokenizer, device: str, batch: int, seq: int):
    """A [batch, seq] batch whose later rows are padded (the attention-mask path must be the one traced)."""
    import torch

    g = torch.Generator().manual_seed(seq * 1000 + batch)
    low = 1000 if len(tokenizer) > 2000 else 1
    ids = torch.randint(low, len(tokenizer), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        keep = max(1, seq - (row * seq) // (batch + 1))
        mask[row, keep:] = 0
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id or 0)
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------- the two paths


def aoti_compile(model, tokenizer, package: Path, device: str, max_batch: int, max_length: int, mode: str,
                 quantized: bool) -> None:
    import torch
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch)
    seq = Dim("seq", min=2, max=max_length)
    example = example_inputs(tokenizer, device, 2, min(16, max_length))
    with torch.no_grad():
        exported = torch.export.export(model, example, strict=False,
                                       dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                       "attention_mask": {0: batch, 1: seq}})
    configs = {"max_autotune": True} if mode == "max-autotune" else {}
    if quantized:
        configs["force_fuse_int_mm_with_mul"] = True  # torchao's recommendation for int8 matmuls
    # aoti_compile_and_package writes device/ISA entries into the *global* aot_inductor.metadata, which
    # is part of every FX-graph cache key: a later torch.compile in this process would then save cache
    # artifacts that no fresh process ever looks up. Patching restores the global value afterwards.
    with torch._inductor.config.patch({"aot_inductor.metadata": {}}):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(package), inductor_configs=configs)


def aoti_in_child(src: Path, package: Path, device: str, precision: str, max_batch: int, max_length: int,
                  mode: str, quantized: bool) -> "str | None":
    """Export + AOTInductor compile + a load-and-run check, in a child process. None on success, else the
    reason. Why a child: AOTInductor has crashed in native code (SIGSEGV; CUDA, torch 2.11, bf16 MiniLM on
    an H200), and a crash in this process would take the whole build down instead of falling back."""
    import subprocess
    import sys

    job = {"src": str(src), "package": str(package), "device": device, "precision": precision,
           "max_batch": max_batch, "max_length": max_length, "mode": mode, "quantized": quantized}
    proc = subprocess.run([sys.executable, "-m", "optforge.stages.compile", json.dumps(job)],
                          capture_output=True, text=True)
    if proc.returncode == 0 and package.is_file():
        return None
    if proc.returncode < 0:
        return f"AOTInductor crashed (signal {-proc.returncode})"
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    return "AOTInductor failed: " + (lines[-1] if lines else f"exit status {proc.returncode}")


def _aoti_child(job: dict) -> None:
    """The child side of `aoti_in_child`: compile, then load the package and run the extreme shapes."""
    import torch

    from optforge import training

    training.configure_threads()
    package = Path(job["package"])
    model, tokenizer, _ = load_eager(Path(job["src"]), job["device"], job["precision"])
    aoti_compile(model, tokenizer, package, job["device"], job["max_batch"], job["max_length"], job["mode"],
                 quantized=job["quantized"])
    fn = torch._inductor.aoti_load_package(str(package))
    with torch.inference_mode():
        for b, s in [(1, 3), (job["max_batch"], job["max_length"])]:
            fn(*example_inputs(tokenizer, job["device"], b, s))


def warmup_shapes(max_batch: int, max_length: int) -> list[list[int]]:
    """Batch 1 is specialised by Dynamo (0/1 specialisation), so it gets its own graph; a batch >= 2 and
    the extremes of the sequence range cover the dynamic graph. load_compiled replays them in this order."""
    mid = max(2, min(17, max_length - 1))
    return [list(x) for x in sorted({(1, 3), (1, max_length), (2, mid), (max_batch, 3), (max_batch, max_length)})]


def inductor_compile(model, tokenizer, blob: Path, device: str, max_batch: int, max_length: int, mode: str):
    """torch.compile + warm-up until a full pass over the shapes compiles nothing new (a shape seen
    early can be recompiled once later shapes have made a dimension dynamic), then save the artifacts.
    Returns (compiled fn, passes)."""
    import torch

    _clear_cache_artifacts()
    # Dynamo reuses code it compiled earlier in this process for a structurally equal model (seen on an
    # H200: a second bf16 teacher compile recorded no artifacts at all); a reset makes it trace again, so
    # Inductor's cache hits are recorded into this artifact too.
    torch._dynamo.reset()
    compiled = InferenceInputs(torch.compile(model, mode=None if mode == "default" else mode, dynamic=True))
    passes = replay_warmup(compiled, tokenizer, device, warmup_shapes(max_batch, max_length), max_passes=4)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise StageFailure("torch.compile produced no cache artifacts to save (nothing was compiled)")
    blob.write_bytes(saved[0])
    return compiled, passes


def replay_warmup(fn, tokenizer, device: str, shapes, max_passes: int) -> int:
    """Run `shapes` in order, pass after pass, until a pass adds no Dynamo graph; returns the passes run."""
    import torch
    from torch._dynamo.utils import counters

    for n in range(1, max_passes + 1):
        graphs = counters["stats"]["unique_graphs"]
        with torch.inference_mode():
            for b, s in shapes:
                fn(*example_inputs(tokenizer, device, b, s))
        if n > 1 and counters["stats"]["unique_graphs"] == graphs:
            return n
    raise StageFailure(f"torch.compile keeps recompiling after {max_passes} warm-up passes over {shapes}")


def graphed(compiled_fn, tokenizer, device: str, max_batch: int, max_length: int):
    """The compiled function replayed through CUDA graphs per shape bucket (optforge.cudagraphs). It gets
    the raw compiled callable: its static input buffers are inference tensors already."""
    from optforge.cudagraphs import GraphedForward

    return GraphedForward(compiled_fn, pad_id=tokenizer.pad_token_id or 0, max_batch=max_batch,
                          max_length=max_length, device=device, capture=str(device).startswith("cuda"))


class InferenceInputs:
    """Calls a torch.compile'd model on inference-mode copies of its inputs. Dynamo guards on a tensor's
    dispatch keys, so tensors made inside inference_mode (evaluate's batches) and outside it
    (Runnable.encode) would each need their own graphs, and the second kind would compile at serving
    time. A clone made inside inference_mode is always an inference tensor: one set of graphs serves both."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, input_ids, attention_mask):
        import torch

        with torch.inference_mode():
            return self.fn(input_ids.clone(), attention_mask.clone())


def _clear_cache_artifacts() -> None:
    """Artifacts recorded by earlier compiles in this process do not belong in this artifact."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager.clear()
    except (ImportError, AttributeError):
        pass


def verify(fn, model, tokenizer, device: str, max_batch: int, max_length: int) -> tuple[float, float]:
    """(max |fn - model| over the check shapes, max |eager logit|)."""
    import torch

    worst, scale = 0.0, 0.0
    big = min(32, max_batch)
    mid = max(2, min(17, max_length - 1))
    with torch.inference_mode():
        for b, s in [(1, 3), (1, max_length), (big, 3), (big, max_length), (5 if max_batch >= 5 else 2, mid)]:
            inputs = example_inputs(tokenizer, device, b, s)
            ref = model(*inputs).float()
            try:
                got = fn(*inputs).float()
            except RuntimeError as e:
                raise StageFailure(f"compiled model fails at batch {b}, seq {s}: {one_line(e)}") from e
            if not torch.isfinite(got).all():
                raise StageFailure(f"compiled model gives non-finite logits at batch {b}, seq {s}")
            worst = max(worst, (got - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    return worst, scale


# --------------------------------------------------------------------------- loading


def load_compiled(artifact_dir, device: str, precision: str = "fp32"):
    """`runtime.FORMATS` loader for "aoti" and "compiled" artifacts -> Runnable."""
    import torch
    from transformers import AutoTokenizer

    from optforge import modeling

    artifact_dir = Path(artifact_dir)
    meta = modeling.read_meta(artifact_dir)
    if meta.get("device", device) != device:
        raise StageFailure(f"compiled artifact was built for {meta['device']}, not {device}")
    if meta["format"] == "aoti":
        tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir / modeling.TOKENIZER_DIR))
        fn = torch._inductor.aoti_load_package(str(artifact_dir / PACKAGE))
        return _aoti_runnable_class()(fn, tokenizer, meta, device, precision=meta["precision"],
                                      artifact_dir=artifact_dir, description=f"aoti {meta['precision']}",
                                      shapes_dir=artifact_dir)
    if meta["format"] == "compiled":
        model, tokenizer, _ = load_eager(artifact_dir / EAGER_DIR, device, meta["precision"])
        torch.compiler.load_cache_artifacts((artifact_dir / CACHE_BLOB).read_bytes())
        mode = meta.get("compiled_mode", "default")
        fn = InferenceInputs(torch.compile(model, mode=None if mode == "default" else mode, dynamic=True))
        # Replay the compile-time warm-up, same shapes, same order, same passes: the first trace of each
        # graph decides its symbolic shapes (duck sizing, 0/1 specialisation), hence its cache key, so this
        # traces exactly the saved graphs (all cache hits), after which any shape in range passes a guard.
        replay_warmup(fn, tokenizer, device, meta["warmup_shapes"], max_passes=meta["warmup_passes"])
        description = f"torch.compile {mode} {meta['precision']}"
        if meta.get("cuda_graphs"):
            fn = graphed(fn.fn, tokenizer, device, meta["max_batch"], meta["max_length"])
            description += " + CUDA graphs"
        from optforge.runtime import Runnable

        return Runnable(fn, tokenizer, meta, device, precision=meta["precision"], module=model,
                        artifact_dir=artifact_dir, description=description)
    raise OptforgeError(f"{artifact_dir}: not a compiled artifact (format {meta['format']!r})")


@functools.lru_cache(maxsize=None)
def _aoti_runnable_class():
    """Built on first use: runtime imports torch, and stage modules import torch only inside functions."""
    from optforge.runtime import Runnable, flops_per_token

    class AOTIRunnable(Runnable):
        """A Runnable around an AOTI package, which has no module to inspect: parameter counts come from
        optforge_model.json, FLOPs from a weightless (meta-device) skeleton with the saved Linear shapes."""

        def __init__(self, *args, shapes_dir: Path, **kwargs):
            super().__init__(*args, **kwargs)
            self._shapes_dir = shapes_dir
            self._skeleton = None

        def param_count(self) -> tuple[int, int]:
            return int(self.meta["params"]), int(self.meta["nonzero_params"])

        def flops_per_token(self, seq_len: int):
            import torch

            from optforge.stages.quantize import float_skeleton

            if self._skeleton is None:
                with torch.device("meta"):
                    self._skeleton = float_skeleton(self._shapes_dir, self.meta)
            return flops_per_token(self._skeleton, seq_len)

    return AOTIRunnable


# --------------------------------------------------------------------------- helpers


def _param_count(model) -> tuple[int, int]:
    from optforge.runtime import _count, _state_tensors

    total = nonzero = 0
    for t in _state_tensors(model.state_dict()):
        n, nz = _count(t)
        total += n
        nonzero += nz
    return total, nonzero


def _artifact_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


if __name__ == "__main__":  # the AOTInductor child process (aoti_in_child)
    import sys

    _aoti_child(json.loads(sys.argv[1]))
