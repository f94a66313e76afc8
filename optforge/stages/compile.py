"""compile: a float or quantized model artifact -> a compiled artifact a cached build reuses without
compiling again (optforge.artifacts.compiled saves and loads it). Two paths; the metrics say which one was
taken and why:

  "aoti"      (CPU) torch.export.export with a dynamic batch dim (1..max_batch) and sequence dim
              (2..max_length), then AOTInductor -> model.pt2, in a child process (`aoti_in_child`).
  "compiled"  when export/AOTI fails (PyTorch's dynamic-int8 Linear keeps its weights in a TorchScript
              packed-params object that export cannot trace), on CUDA (AOTInductor crashed there), and for
              CUDA graphs: torch.compile(dynamic=True) warmed up on representative shapes, and Inductor's
              cache artifacts saved (`inductor_path`).

Modes are registered in optforge.methods.compile ("default", "max-autotune", "reduce-overhead": CUDA graphs
on CUDA, "default" elsewhere, with a note). Before the stage returns, the artifact is reloaded (aoti) and
its logits are compared with the eager model's at batch 1 and max(32) batch, at sequence lengths 3, a
padded middle one and max_length (`verify`; tolerance: methods.compile.allowed_difference).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from optforge.errors import StageFailure, one_line
from optforge.recipe import CompileParams
from optforge.stages.base import RowStep, StageContext, StageKind


def run(ctx: StageContext) -> dict:
    from optforge import modeling, training
    from optforge.artifacts import compiled as artifact
    from optforge.artifacts.quantized import copy_side_files, linear_shapes
    from optforge.artifacts.runnable import count_params
    from optforge.methods.compile import COMPILE_MODES, allowed_difference, warmup_shapes

    params: CompileParams = ctx.params
    src = Path(ctx.inputs["model"])
    src_meta = modeling.read_meta(src)
    if src_meta.get("format") in ("aoti", "compiled"):
        raise StageFailure(f"compile needs a float or quantized model, got format {src_meta['format']!r}")
    threads = training.configure_threads()
    model, tokenizer, eager_meta = artifact.load_eager(src, ctx.device, params.precision)
    precision = eager_meta["precision"]
    requested = COMPILE_MODES[params.mode]
    compiled_mode, note = requested.resolve(ctx.device)
    cuda_graphs = requested.cuda_graphs and ctx.device == "cuda"
    max_batch = max(params.max_batch, 2)
    max_length = min(params.max_length, int(src_meta["max_length"]))

    start = time.perf_counter()
    path, why = choose_path(ctx, src, src_meta, precision, max_batch, max_length, compiled_mode.name, cuda_graphs)
    passes, compiled = 0, None
    if path == "compiled":
        compiled, passes = inductor_path(model, tokenizer, ctx.out / artifact.CACHE_BLOB, ctx.device, max_batch,
                                         max_length, compiled_mode.name)
        shutil.copytree(src, ctx.out / artifact.EAGER_DIR)
    compile_s = time.perf_counter() - start

    total, nonzero = count_params(model)
    meta = {k: v for k, v in src_meta.items() if k not in ("weights", "weights_format")}
    meta.update({"format": path, "mode": params.mode, "compiled_mode": compiled_mode.name,
                 "cuda_graphs": cuda_graphs, "precision": precision, "device": ctx.device,
                 "max_batch": max_batch, "max_length": max_length, "inner_format": src_meta["format"],
                 "params": total, "nonzero_params": nonzero, "threads": threads,
                 "warmup_shapes": warmup_shapes(max_batch, max_length), "warmup_passes": passes,
                 "source": src_meta.get("source", "model") + f" + compile {params.mode} ({path})"})
    meta.setdefault("linear_shapes", linear_shapes(model))
    copy_side_files(src, ctx.out)
    (ctx.out / modeling.META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    start = time.perf_counter()
    fn = artifact.load(ctx.out, ctx.device, precision).fn if path == "aoti" else compiled
    load_s = time.perf_counter() - start
    if cuda_graphs:
        fn = artifact.graphed(compiled.fn, tokenizer, ctx.device, max_batch, max_length)
    max_diff, scale = verify(fn, model, tokenizer, ctx.device, max_batch, max_length)
    allowed = allowed_difference(src_meta["format"], precision, scale,
                                 ctx.input_metrics.get("model", {}).get("logit_max_abs_diff"))
    if max_diff > allowed:
        raise StageFailure(f"compiled ({path}) logits differ from eager by {max_diff:.3g} (> {allowed:.3g} allowed)")
    metrics = {"time_s": compile_s, "compile_s": compile_s, "path": path, "mode": params.mode,
               "compiled_mode": compiled_mode.name, "cuda_graphs": cuda_graphs, "precision": precision,
               "inner_format": src_meta["format"],
               "logit_max_abs_diff": max_diff, "logit_diff_allowed": allowed, "logit_scale": scale,
               "max_batch": max_batch,
               "max_length": max_length, "artifact_mb": _artifact_bytes(ctx.out) / 2**20}
    if path == "aoti":
        metrics["load_s"] = load_s
    if why:
        metrics["fallback_reason"] = why
    if note:
        metrics["notes"] = [note]
    ctx.log(f"{ctx.name}: {path} in {compile_s:.1f}s, max |dlogit| vs eager {max_diff:.2g}"
            + (f" ({why})" if why else ""))
    return metrics


KIND = StageKind(kind="compile", version="2", params_model=CompileParams, run=run, hardware_bound=True,
                 holds_code=True,
                 row=RowStep(order=20, measure=False, applies=lambda recipe, c: c.compile != "none",
                             params=lambda recipe, c: CompileParams.for_row(recipe, c)))


def choose_path(ctx: StageContext, src: Path, src_meta: dict, precision: str, max_batch: int, max_length: int,
                compiled_mode: str, cuda_graphs: bool) -> tuple[str, "str | None"]:
    """("aoti" | "compiled", why not aoti). On CPU, AOTInductor is tried first (in a child process)."""
    from optforge.artifacts.compiled import PACKAGE

    if cuda_graphs:  # a captured graph cannot be serialised: captured at load time over compiled code
        return "compiled", "CUDA graphs are captured at load time over torch.compile code"
    if ctx.device == "cuda":
        # Measured on an H200 (torch 2.11, CUDA 13): AOTInductor crashed (SIGSEGV) on every model we gave
        # it, after ~2 minutes of compiling; the child process contained it, but the time was lost.
        return "compiled", "on CUDA, torch.compile cache artifacts (AOTInductor crashed here)"
    failure = aoti_in_child(src, ctx.out / PACKAGE, ctx.device, precision, max_batch, max_length, compiled_mode,
                            quantized=src_meta["format"] != "float")
    if failure is None:
        return "aoti", None
    (ctx.out / PACKAGE).unlink(missing_ok=True)  # any export/AOTI failure or crash: the fallback path
    ctx.log(f"{ctx.name}: {failure}; falling back to torch.compile cache artifacts")
    return "compiled", failure


# --------------------------------------------------------------------------- the two paths


def aoti_compile(model, tokenizer, package: Path, device: str, max_batch: int, max_length: int, mode: str,
                 quantized: bool) -> None:
    import torch
    from torch.export import Dim

    from optforge.artifacts.compiled import example_inputs
    from optforge.methods.compile import COMPILE_MODES

    batch = Dim("batch", min=1, max=max_batch)
    seq = Dim("seq", min=2, max=max_length)
    example = example_inputs(tokenizer, device, 2, min(16, max_length))
    with torch.no_grad():
        exported = torch.export.export(model, example, strict=False,
                                       dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                       "attention_mask": {0: batch, 1: seq}})
    configs = dict(COMPILE_MODES[mode].inductor_configs)
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
    from optforge.procs import child_env

    proc = subprocess.run([sys.executable, "-m", "optforge.stages.compile", json.dumps(job)],
                          capture_output=True, text=True, env=child_env())
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
    from optforge.artifacts.compiled import example_inputs, load_eager

    training.configure_threads()
    package = Path(job["package"])
    model, tokenizer, _ = load_eager(Path(job["src"]), job["device"], job["precision"])
    aoti_compile(model, tokenizer, package, job["device"], job["max_batch"], job["max_length"], job["mode"],
                 quantized=job["quantized"])
    fn = torch._inductor.aoti_load_package(str(package))
    with torch.inference_mode():
        for b, s in [(1, 3), (job["max_batch"], job["max_length"])]:
            fn(*example_inputs(tokenizer, job["device"], b, s))


def inductor_path(model, tokenizer, blob: Path, device: str, max_batch: int, max_length: int, mode: str):
    """torch.compile + warm-up until a full pass over the shapes compiles nothing new (a shape seen
    early can be recompiled once later shapes have made a dimension dynamic), then save the artifacts.
    Returns (compiled fn, passes)."""
    import torch

    from optforge.artifacts.compiled import replay_warmup, torch_compile
    from optforge.methods.compile import warmup_shapes

    _clear_cache_artifacts()
    # Dynamo reuses code it compiled earlier in this process for a structurally equal model (seen on an
    # H200: a second bf16 teacher compile recorded no artifacts at all); a reset makes it trace again, so
    # Inductor's cache hits are recorded into this artifact too.
    torch._dynamo.reset()
    compiled = torch_compile(model, mode)
    passes = replay_warmup(compiled, tokenizer, device, warmup_shapes(max_batch, max_length), max_passes=4)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise StageFailure("torch.compile produced no cache artifacts to save (nothing was compiled)")
    blob.write_bytes(saved[0])
    return compiled, passes


def _clear_cache_artifacts() -> None:
    """Artifacts recorded by earlier compiles in this process do not belong in this artifact."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager.clear()
    except (ImportError, AttributeError):
        pass


def verify(fn, model, tokenizer, device: str, max_batch: int, max_length: int,
           what: str = "compiled model") -> tuple[float, float]:
    """(max |fn - model| over the check shapes, max |eager logit|); StageFailure naming `what` when `fn`
    fails or gives non-finite logits at a shape."""
    import torch

    from optforge.artifacts.compiled import example_inputs
    from optforge.methods.compile import verify_shapes

    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        for b, s in verify_shapes(max_batch, max_length):
            inputs = example_inputs(tokenizer, device, b, s)
            ref = model(*inputs).float()
            try:
                got = fn(*inputs).float()
            except RuntimeError as e:
                raise StageFailure(f"{what} fails at batch {b}, seq {s}: {one_line(e)}") from e
            if not torch.isfinite(got).all():
                raise StageFailure(f"{what} gives non-finite logits at batch {b}, seq {s}")
            worst = max(worst, (got - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    return worst, scale


def _artifact_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


if __name__ == "__main__":  # the AOTInductor child process (aoti_in_child)
    import sys

    from optforge.procs import die_with_parent

    die_with_parent()
    _aoti_child(json.loads(sys.argv[1]))
