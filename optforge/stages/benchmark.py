"""Benchmark stage: latency, throughput, memory and %-of-peak of one model artifact on this device, and
its speedup over the baseline configuration measured in the same run.

Scopes, all measured interleaved at each batch size (optforge.paired):
  model         - tensors pre-tokenized and already on the device; only `runnable.forward` is timed;
  e2e           - raw strings -> `runnable.predict` -> labels/probabilities as Python objects
                  (tokenization, host<->device copies, softmax, Python glue included);
  pretokenized  - token ids (as a client that tokenizes would send them) -> `runnable.predict_ids`:
                  e2e without tokenization, so e2e - pretokenized is the tokenizer's share;
  e2e_pipelined - throughput of a stream of batches, `predict` one batch at a time vs
                  `predict_pipelined` (next batch tokenized while this one runs); see `_pipelined`.

Paired measurement: every row but the baseline's gets the baseline row's final artifact as its `baseline`
input and loads both in this process. Per batch size, `paired.measure_paired` runs short blocks of calls
of every (side, scope) in rounds (scopes rotated, sides in ABBA order), so a drift or a neighbour hits
both sides of a ratio alike; speedup = median(baseline calls) / median(row calls) per scope, with a
bootstrap interval over rounds, measured until the interval is narrow enough (`ci_width`) or the batch
size's time box (`max_seconds`, warm-up included) is spent. The baseline's own stage measures its scopes
the same way with one side.

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

from optforge import bench, hardware, paired
from optforge.device import cpu_info, nvidia_driver
from optforge.errors import KERNEL_ERRORS, DataError, StageFailure, one_line
from optforge.recipe import BenchmarkParams
from optforge.stages.base import RowStep, StageContext, StageKind

METHOD = "paired-abba-bootstrap"


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
        baseline = None
        if "baseline" in ctx.inputs:  # every row but the baseline's: compared in this run
            baseline = load_runnable(ctx.inputs["baseline"], ctx.device, params.baseline_precision or "fp32",
                                     verify=False)
        return benchmark_runnable(runnable, texts, params, load_s=load_s,
                                  compute_precision=compute_precision(read_meta(ctx.inputs["model"]), params.precision),
                                  log=ctx.log, baseline=baseline)


KIND = StageKind(kind="benchmark", version="5", params_model=BenchmarkParams, run=run, hardware_bound=True,
                 measures_time=True, row=RowStep(order=110, measure=True, applies=lambda recipe, c: True,
                             params=lambda recipe, c: recipe.benchmark.model_dump(mode="json") | {"precision": c.precision},
                             needs_data=True, compares=True))


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


# --------------------------------------------------------------------------- tokenizer threads


def tokenizer_threads(environ=None, cpus: Optional[int] = None) -> tuple[int, str]:
    """(threads, why) the Rust tokenizers' `encode_batch` (the e2e scope's tokenizer) runs on in this
    process. Its rayon pool is sized once, at its first use, from the environment: TOKENIZERS_PARALLELISM
    false/0/off/no -> sequential; else RAYON_NUM_THREADS (> 0), else the deprecated RAYON_RS_NUM_CPUS
    (> 0), else the CPUs the process may run on. Setting these in a process that has tokenized already
    changes nothing; to pin the count, set RAYON_NUM_THREADS in the environment `optforge build` starts in.
    `cpus` (tests): the CPU count to assume."""
    env = os.environ if environ is None else environ
    par = env.get("TOKENIZERS_PARALLELISM")
    if par is not None and par.strip().lower() in ("", "off", "false", "f", "no", "n", "0"):
        return 1, f"TOKENIZERS_PARALLELISM={par}: sequential"
    for var in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        try:
            n = int(env.get(var, ""))
        except ValueError:
            continue
        if n > 0:
            return n, f"{var}={n}"
        if var == "RAYON_NUM_THREADS" and n == 0:
            break  # rayon: 0 means its default
    n = cpus if cpus is not None else _available_cpus()
    return n, "rayon's default: the CPUs this process may run on (RAYON_NUM_THREADS unset)"


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
                       compute_precision: Optional[str] = None, log: Callable[[str], None] = print,
                       baseline=None) -> dict:
    """Time `runnable` (the Runnable API of optforge.artifacts.runnable) on `texts` with `params.threads` (default:
    all cores), interleaved with `baseline` (another Runnable: the baseline row's model) when given;
    returns the benchmark metrics of docs/ARCHITECTURE.md plus the extras documented in
    docs/results-schema.md."""
    with _threads(params.threads):
        return _benchmark(runnable, texts, params, load_s, compute_precision, log, baseline)


def _encode(runnable, sample: list[str], b: int, pad_to: Optional[int], who: str = ""):
    try:
        return runnable.encode(sample, pad_to=pad_to)
    except KERNEL_ERRORS as e:
        raise StageFailure(f"{who}encode at batch {b}: {one_line(e)}") from e


def _predict_kw(runnable, params: BenchmarkParams) -> dict:
    """`pad_to` for predict/predict_ids when the recipe fixes the length and the runnable takes it."""
    return {"pad_to": params.fixed_length} if (params.fixed_length is not None
                                               and "pad_to" in _arg_names(runnable.predict)) else {}


def _scope_fns(runnable, sample: list[str], batch, kw: dict, params: BenchmarkParams) -> dict:
    """scope -> (what it calls, fn) of one side at one batch size."""
    fns = {"model": ("forward", lambda: runnable.forward(batch))}
    if params.end_to_end:
        fns["e2e"] = ("predict", lambda: runnable.predict(sample, **kw))
        if hasattr(runnable, "predict_ids"):  # token ids in, predictions out: e2e minus tokenization
            ids = runnable.tokenize(sample)
            fns["pretokenized"] = ("predict_ids", lambda: runnable.predict_ids(ids, **kw))
    return fns


PAIRED_KEYS = ("speedup", "ci_low", "ci_high", "half_width", "conclusive", "blocks", "calls_row", "calls_base", "seed")
RUN_KEYS = ("rounds", "stopped", "elapsed_s", "warmup_s", "too_slow", "block_calls")


def _benchmark(runnable, texts, params, load_s, compute_precision, log, baseline) -> dict:
    import torch

    device = runnable.device
    sync = _sync_fn(device)
    dev = benchmark_device_info(device)
    threads = torch.get_num_threads()
    tok_threads, tok_source = tokenizer_threads()
    cprec = compute_precision or params.precision
    pk = hardware.peak(dev, cprec, threads if dev["kind"] == "cpu" else None)
    peak_flops = pk["peak_flops"] if pk else None
    mem = _PeakMemory(device)
    kw = _predict_kw(runnable, params)

    total, nonzero = runnable.param_count()
    batches: dict[str, dict] = {}
    warmup_s = 0.0
    first_call_s: Optional[float] = None
    peak_above, peak_total = 0.0, 0.0
    flops_per_sample: Optional[float] = None
    for b in params.batch_sizes:
        sample = sample_texts(texts, b, params.seed)
        batch = _encode(runnable, sample, b, params.fixed_length)
        seq_len = int(batch["input_ids"].shape[1])
        mask = batch.get("attention_mask")
        real_tokens = int(mask.sum().item()) if mask is not None else b * seq_len
        fpt = _flops_per_token(runnable, seq_len)
        flops = fpt * seq_len * b if fpt is not None else None
        if flops_per_sample is None and flops is not None:
            flops_per_sample = flops / b

        # first calls (lazy init, compilation; a deterministic failure -> StageFailure), the row's first:
        # its peak memory is read before the baseline runs
        sides = {"row": _scope_fns(runnable, sample, batch, kw, params)}
        mem.reset()
        for scope, (what, fn) in sides["row"].items():
            t = _first_call(fn, f"{what} at batch {b}")
            if first_call_s is None and scope == "model":
                first_call_s = t
            warmup_s += t
        above, tot = mem.peak()
        peak_above, peak_total = max(peak_above, above), max(peak_total, tot)
        if baseline is not None:
            base_batch = _encode(baseline, sample, b, params.fixed_length, "baseline ")
            sides["base"] = _scope_fns(baseline, sample, base_batch, _predict_kw(baseline, params), params)
            for what, fn in sides["base"].values():
                warmup_s += _first_call(fn, f"baseline {what} at batch {b}")

        fns = {(side, scope): fn for side, scopes in sides.items() for scope, (_, fn) in scopes.items()}
        res = measure_paired(fns, params, b, sync)
        warmup_s += res["warmup_s"]
        stats = {side: {scope: _stats(res["times"].get(side, {}).get(scope), b, params, flops, peak_flops)
                        for scope in paired.SCOPES} for side in sides}
        row = stats["row"]

        pipelined = None
        if params.end_to_end and hasattr(runnable, "predict_pipelined") and params.stream_budget > 0:
            if row["e2e"] is None:
                pipelined = {"skipped": f"no timed end-to-end call fitted max_seconds {params.max_seconds:g}"}
            else:
                pipelined = _pipelined(runnable, sample, kw, row["e2e"]["p50"] / 1000.0, params.stream_budget)
        entry = {"model": row["model"], "e2e": row["e2e"], "pretokenized": row["pretokenized"],
                 "e2e_pipelined": pipelined, "seq_len": seq_len, "real_tokens": real_tokens, "flops": flops,
                 "peak_mem_mb": above}
        entry["scope_order"] = (res.get("scope_order") or {}).get("row") or []
        run_info = {k: res[k] for k in RUN_KEYS}
        if baseline is not None:
            entry["baseline"] = stats["base"]
            entry["paired"] = {scope: {k: c.get(k) for k in PAIRED_KEYS} for scope, c in res["compare"].items()}
            entry["paired_run"] = run_info | {k: res[k] for k in ("ci_width", "confidence", "min_rounds")} | {
                "interval": res.get("interval")}
        else:
            entry["run"] = run_info
        batches[str(b)] = entry
        log(_batch_line(b, entry, seq_len))
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()

    return {
        "device": dev,
        "threads": threads,
        "tokenizer_threads": tok_threads,
        "tokenizer_threads_source": tok_source,
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
                   "e2e_padding": "fixed" if kw else "dynamic"},
        "method": METHOD,
        "baseline": ({"config": params.baseline_config, "precision": params.baseline_precision}
                     if baseline is not None else None),
        "batches": batches,
    }


def measure_paired(fns: dict, params, seed_part: int, sync) -> dict:
    """`paired.measure_paired` with a recipe's benchmark settings, the seed mixed with `seed_part` (a batch
    size), and the garbage collector run before, not during, the measurement: garbage from one call would
    otherwise be billed to a random later one (and to either side of a ratio). Shared by the causal-LM
    benchmark (stages/lm_benchmark.py)."""
    gc.collect()
    gc.disable()
    try:
        return paired.measure_paired(fns, warmup=params.warmup, max_seconds=params.max_seconds,
                                     ci_width=params.ci_width, min_rounds=params.min_rounds,
                                     confidence=params.confidence, seed=paired.mix_seed(params.seed, seed_part),
                                     sync=sync)
    finally:
        gc.enable()


def _stats(times: Optional[list[float]], b: int, params: BenchmarkParams, flops, peak_flops) -> Optional[dict]:
    """STATS of one side and scope from its timed calls (None: none fitted in the time box)."""
    if not times:
        return None
    stats = bench.summarize(times, b, min_runs=params.min_runs)
    stats["pct_peak"] = bench.pct_of_peak(flops, stats["p50"] / 1000.0, peak_flops)
    return stats


def _interval(c: Optional[dict]) -> str:
    if not c or c.get("speedup") is None:
        return "n/a"
    if c.get("ci_low") is None:
        return f"{c['speedup']:.2f}x (no interval)"
    return f"{c['speedup']:.2f}x ({c['ci_low']:.2f}-{c['ci_high']:.2f})"


def _batch_line(b: int, entry: dict, seq_len: int) -> str:
    """One log line per batch size: the row's p50s, and the speedup with its interval per scope."""
    names = {"model": "model", "e2e": "e2e", "pretokenized": "pre-tokenized"}
    p50s = [f"{names[s]} p50 {entry[s]['p50']:.3f} ms" for s in ("model", "e2e", "pretokenized") if entry[s]]
    parts = [", ".join(p50s) or "no timed call"]
    if "paired" in entry:
        parts.append("speedup " + ", ".join(f"{names[s]} {_interval(c)}" for s, c in entry["paired"].items()))
    pipe = entry["e2e_pipelined"]
    if pipe and pipe.get("gain"):
        parts.append(f"pipelined {pipe['gain']:.2f}x the samples/s of one batch at a time")
    broken = [f"{o['outer']} < {o['inner']}" for o in entry.get("scope_order") or [] if o["holds"] is False]
    if broken:
        parts.append("scope order broken beyond its interval: " + ", ".join(broken))
    run = entry.get("paired_run") or entry["run"]
    slow = ", too slow for the interval" if run["too_slow"] and "paired" in entry else ""
    runs = entry["model"]["runs"] if entry["model"] else 0
    return (f"  batch {b}: " + "; ".join(parts)
            + f" (seq {seq_len}, {run['rounds']} rounds, stopped on {run['stopped']}{slow}, "
              f"{run['elapsed_s']:.1f} s, {runs} model runs)")


PIPELINE_BATCHES = (4, 32)  # fewest / most batches in one timed stream


def _pipelined(runnable, sample: list[str], kw: dict, e2e_s: float, budget_s: float) -> dict:
    """Throughput of a stream of batches end to end, one batch at a time (`predict` in a loop) and
    pipelined (`predict_pipelined`: tokenizing the next batch while this one runs). The stream is as
    long as fits `budget_s` (`stream_seconds`, default half of `max_seconds`) with its passes (a 2-batch
    warm-up, then each way timed twice, alternating; the faster pass counts): 4..32 batches. A row whose
    batch takes more than a quarter of the budget is not streamed ({"skipped": reason}), so the stream
    never costs more than 4.5 budgets."""
    lo, hi = PIPELINE_BATCHES
    if e2e_s > budget_s / 4:
        return {"skipped": f"one batch takes {e2e_s:.2f} s > a quarter of the stream's {budget_s:g} s"}
    n = max(lo, min(hi, int((budget_s / max(e2e_s, 1e-9) - 2) / 4)))
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
