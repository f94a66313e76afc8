"""Benchmark stage: latency, throughput, memory and %-of-peak of one model artifact on this device.

Scopes, timed separately at each batch size:
  model         - tensors pre-tokenized and already on the device; only `runnable.forward` is timed;
  e2e           - raw strings -> `runnable.predict` -> labels/probabilities as Python objects
                  (tokenization, host<->device copies, softmax, Python glue included);
  pretokenized  - token ids (as a client that tokenizes would send them) -> `runnable.predict_ids`:
                  e2e without tokenization, so e2e - pretokenized is the tokenizer's share;
  e2e_pipelined - throughput of a stream of batches, `predict` one batch at a time vs
                  `predict_pipelined` (next batch tokenized while this one runs); see `_pipelined`.

Inputs are real eval sentences (so real lengths), one seeded sample per batch size, dynamically padded
to the longest in the batch (or to `fixed_length`). Timing every run on the *same* batch keeps the
coefficient of variation a measure of timing noise rather than of input lengths.

torch is imported inside the functions only (the stage registry must stay cheap to import).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

from optforge import bench, hardware
from optforge.device import cpu_info, nvidia_driver
from optforge.errors import KERNEL_ERRORS, DataError, StageFailure, one_line
from optforge.recipe import BenchmarkParams
from optforge.stages.base import RowStep, StageContext, StageKind



def run(ctx: StageContext) -> dict:
    from optforge.artifacts import compute_precision, load_runnable
    from optforge.modeling import read_meta

    params: BenchmarkParams = ctx.params
    texts = load_eval_texts(_eval_file(ctx))
    with _threads(params.threads):
        sync = _sync_fn(ctx.device)
        t0 = time.perf_counter()
        runnable = load_runnable(ctx.inputs["model"], ctx.device, params.precision, verify=False)
        sync()
        load_s = time.perf_counter() - t0
        return benchmark_runnable(runnable, texts, params, load_s=load_s,
                                  compute_precision=compute_precision(read_meta(ctx.inputs["model"]), params.precision),
                                  log=ctx.log)


KIND = StageKind(kind="benchmark", version="3", params_model=BenchmarkParams, run=run, hardware_bound=True,
                 row=RowStep(order=110, measure=True, applies=lambda recipe, c: True,
                             params=lambda recipe, c: recipe.benchmark.model_dump(mode="json") | {"precision": c.precision}, needs_data=True))


# --------------------------------------------------------------------------- inputs


def _eval_file(ctx: StageContext) -> Path:
    if "data" in ctx.inputs and (ctx.inputs["data"] / "eval.jsonl").is_file():
        return ctx.inputs["data"] / "eval.jsonl"
    if "eval" in ctx.data_files:
        return Path(ctx.data_files["eval"])
    raise DataError(f"benchmark {ctx.name}: no eval.jsonl in the data artifact {ctx.inputs.get('data')}")


def load_eval_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError) as e:
                    raise DataError(f"{path}:{i}: expected a JSON object with a \"text\" field ({e})") from e
    if not texts:
        raise DataError(f"{path}: no sentences to benchmark with")
    return texts


def sample_texts(texts: list[str], batch_size: int, seed: int) -> list[str]:
    """`batch_size` sentences drawn with replacement, seeded per (seed, batch size)."""
    rng = random.Random(seed * 1_000_003 + batch_size)
    return [texts[rng.randrange(len(texts))] for _ in range(batch_size)]


# --------------------------------------------------------------------------- device helpers


@contextlib.contextmanager
def _threads(threads: Optional[int]):
    """torch.set_num_threads(threads or all cores) for the duration; the engine's setting is restored."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _sync_fn(device) -> Callable[[], None]:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def benchmark_device_info(device) -> dict:
    """The `device` object of the benchmark metrics: torch's view of the CUDA device (name, capability,
    memory) with the driver, or this CPU's record (`device.cpu_info()`, whose flags decide its peak)."""
    import torch

    if str(device).startswith("cuda"):
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(idx),
                "capability": f"{props.major}.{props.minor}", "memory_gb": round(props.total_memory / 2**30, 1),
                "driver": nvidia_driver(), "cuda": torch.version.cuda}
    return cpu_info()


class _PeakMemory:
    """Peak memory above the level at `reset()`: CUDA max_memory_allocated, or on CPU the process's
    high-water RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS at reset."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.method = "cuda.max_memory_allocated" if self.cuda else "VmHWM-VmRSS"
        self.base = 0.0

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "VmHWM-VmRSS (no reset: includes earlier peaks)"
        self.base = _proc_status_mb("VmRSS") or 0.0

    def peak(self) -> tuple[float, float]:
        """(peak above the reset level, absolute peak) in MiB."""
        if self.cuda:
            import torch

            total = torch.cuda.max_memory_allocated() / 2**20
        else:
            total = _proc_status_mb("VmHWM") or 0.0
        return max(total - self.base, 0.0), total


def _proc_status_mb(key: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------- the harness


def _first_call(fn: Callable[[], object], what: str) -> float:
    """Run the first (compile/lazy-init) call; an expected error that repeats on a second try is a
    deterministic failure of this configuration -> StageFailure with a one-line reason."""
    t0 = time.perf_counter()
    try:
        fn()
    except KERNEL_ERRORS as first:
        try:
            fn()
        except KERNEL_ERRORS as again:
            raise StageFailure(f"{what}: {one_line(again)}") from again
        raise StageFailure(f"{what}: flaky first call ({one_line(first)})") from first
    return time.perf_counter() - t0


def benchmark_runnable(runnable, texts: list[str], params: BenchmarkParams, *, load_s: float = 0.0,
                       compute_precision: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Time `runnable` (the Runnable API of optforge.artifacts.runnable) on `texts` with `params.threads` (default:
    all cores); returns the benchmark metrics of docs/ARCHITECTURE.md plus the extras documented in
    docs/results-schema.md."""
    with _threads(params.threads):
        return _benchmark(runnable, texts, params, load_s, compute_precision, log)


def _benchmark(runnable, texts, params, load_s, compute_precision, log) -> dict:
    import torch

    device = runnable.device
    sync = _sync_fn(device)
    dev = benchmark_device_info(device)
    threads = torch.get_num_threads()
    cprec = compute_precision or params.precision
    pk = hardware.peak(dev, cprec, threads if dev["kind"] == "cpu" else None)
    peak_flops = pk["peak_flops"] if pk else None
    mem = _PeakMemory(device)
    predict_pad = params.fixed_length is not None and "pad_to" in _arg_names(runnable.predict)

    total, nonzero = runnable.param_count()
    batches: dict[str, dict] = {}
    warmup_s = 0.0
    first_call_s: Optional[float] = None
    peak_above, peak_total = 0.0, 0.0
    flops_per_sample: Optional[float] = None
    for b in params.batch_sizes:
        sample = sample_texts(texts, b, params.seed)
        try:
            batch = runnable.encode(sample, pad_to=params.fixed_length)
        except KERNEL_ERRORS as e:
            raise StageFailure(f"encode at batch {b}: {one_line(e)}") from e
        seq_len = int(batch["input_ids"].shape[1])
        mask = batch.get("attention_mask")
        real_tokens = int(mask.sum().item()) if mask is not None else b * seq_len
        fpt = _flops_per_token(runnable, seq_len)
        flops = fpt * seq_len * b if fpt is not None else None
        if flops_per_sample is None and flops is not None:
            flops_per_sample = flops / b

        mem.reset()
        model_fn = lambda: runnable.forward(batch)  # noqa: E731
        t = _first_call(model_fn, f"forward at batch {b}")
        first_call_s = t if first_call_s is None else first_call_s
        warmup_s += t
        model_stats, wu = _timed(model_fn, b, params, sync, flops, peak_flops)
        warmup_s += wu

        e2e_stats = pretok_stats = pipelined = None
        if params.end_to_end:
            kw = {"pad_to": params.fixed_length} if predict_pad else {}
            e2e_fn = lambda: runnable.predict(sample, **kw)  # noqa: E731
            warmup_s += _first_call(e2e_fn, f"predict at batch {b}")
            e2e_stats, wu = _timed(e2e_fn, b, params, sync, flops, peak_flops)
            warmup_s += wu
            if hasattr(runnable, "predict_ids"):  # token ids in, predictions out: e2e minus tokenization
                ids = runnable.tokenize(sample)
                pretok_fn = lambda: runnable.predict_ids(ids, **kw)  # noqa: E731
                pretok_stats, wu = _timed(pretok_fn, b, params, sync, flops, peak_flops)
                warmup_s += wu
            if hasattr(runnable, "predict_pipelined"):
                pipelined = _pipelined(runnable, sample, kw, e2e_stats["p50"] / 1000.0, params.max_seconds)
        above, tot = mem.peak()
        peak_above, peak_total = max(peak_above, above), max(peak_total, tot)
        batches[str(b)] = {"model": model_stats, "e2e": e2e_stats, "pretokenized": pretok_stats,
                           "e2e_pipelined": pipelined, "seq_len": seq_len,
                           "real_tokens": real_tokens, "flops": flops, "peak_mem_mb": above}
        log(f"  batch {b}: model p50 {model_stats['p50']:.3f} ms"
            + (f", e2e p50 {e2e_stats['p50']:.3f} ms" if e2e_stats else "")
            + (f", pre-tokenized p50 {pretok_stats['p50']:.3f} ms" if pretok_stats else "")
            + (f", pipelined {pipelined['gain']:.2f}x the samples/s of one batch at a time"
               if pipelined and pipelined.get("gain") else "")
            + f" (seq {seq_len}, {model_stats['runs']} runs)")
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()

    return {
        "device": dev,
        "threads": threads,
        "params": int(total),
        "nonzero_params": int(nonzero),
        "size_mb": runnable.size_bytes / 1e6,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "first_call_s": first_call_s,
        "peak_mem_mb": peak_above,
        "peak_mem_total_mb": peak_total,
        "peak_mem_method": mem.method,
        "flops_per_sample": flops_per_sample,
        "precision": params.precision,
        "compute_precision": cprec,
        "peak_flops": peak_flops,
        "peak_source": (f"{pk['part']}, {pk['source']}" if pk else None),
        "peak_measured_flops": pk.get("measured_flops") if pk else None,
        "description": str(getattr(runnable, "description", "") or ""),
        "inputs": {"pool": len(texts), "seed": params.seed, "fixed_length": params.fixed_length,
                   "e2e_padding": "fixed" if predict_pad else "dynamic"},
        "batches": batches,
    }


def _timed(fn, b: int, params: BenchmarkParams, sync, flops, peak_flops) -> tuple[dict, float]:
    # The collector runs between timed calls, not inside them: garbage from a previous call would
    # otherwise be billed to a random later one and inflate p99.
    gc.collect()
    gc.disable()
    try:
        times, warmup_s = bench.measure(fn, warmup=params.warmup, max_seconds=params.max_seconds, sync=sync)
    finally:
        gc.enable()
    stats = bench.summarize(times, b, min_runs=params.min_runs)
    stats["pct_peak"] = bench.pct_of_peak(flops, stats["p50"] / 1000.0, peak_flops)
    return stats, warmup_s


PIPELINE_BATCHES = (4, 32)  # fewest / most batches in one timed stream


def _pipelined(runnable, sample: list[str], kw: dict, e2e_s: float, max_seconds: float) -> dict:
    """Throughput of a stream of batches end to end, one batch at a time (`predict` in a loop) and
    pipelined (`predict_pipelined`: tokenizing the next batch while this one runs). The stream is as
    long as `max_seconds` allows (4..32 batches); each way is timed twice, alternating, and the faster
    pass counts. A row slower than `max_seconds` per batch is not streamed ({"skipped": reason})."""
    if e2e_s > max_seconds:
        return {"skipped": f"one batch takes {e2e_s:.2f} s > max_seconds {max_seconds:g}"}
    lo, hi = PIPELINE_BATCHES
    n = max(lo, min(hi, int(max_seconds / max(e2e_s, 1e-9))))
    stream = [sample] * n
    list(runnable.predict_pipelined(stream[:2], **kw))  # the worker thread's first call warms up too
    best = {"sequential": float("inf"), "pipelined": float("inf")}
    for _ in range(2):
        t0 = time.perf_counter()
        for texts in stream:
            runnable.predict(texts, **kw)
        best["sequential"] = min(best["sequential"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _out in runnable.predict_pipelined(stream, **kw):
            pass
        best["pipelined"] = min(best["pipelined"], time.perf_counter() - t0)
    samples = n * len(sample)
    seq, pipe = samples / best["sequential"], samples / best["pipelined"]
    return {"batches": n, "throughput": pipe, "sequential_throughput": seq, "gain": pipe / seq}


def _flops_per_token(runnable, seq_len: int) -> Optional[float]:
    fn = getattr(runnable, "flops_per_token", None)
    if fn is None:
        return None
    try:
        v = fn(seq_len)
    except NotImplementedError:
        return None
    return float(v) if v is not None else None


def _arg_names(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
