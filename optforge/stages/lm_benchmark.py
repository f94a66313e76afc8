"""lm_benchmark (a `benchmark:<config>` stage of a causal-lm recipe): prefill, time to first token and decode
throughput of one LM artifact on this device, each paired with the baseline row's in the same run
(optforge.paired, as the classifier benchmark: rounds of interleaved blocks, ABBA, a bootstrap interval on
every speedup, until `ci_width` or the `max_seconds` box of each measurement).

Measurements (prompts are real eval text: consecutive eval sentences joined until long enough, cut to the
prompt length; greedy decoding, fresh KV cache per call; optforge.lm.decode):
  prompt length L (each of `prompt_lengths`, batch 1), one paired measurement with two scopes:
    model  = prefill: token ids already on the device -> the prompt's forward with a new KV cache -> the
             first token id (argmax);
    e2e    = time to first token: the prompt text -> tokenize -> prefill -> argmax -> the id on the host;
  decode batch b (each of `batch_sizes`, prompts of the smallest prompt length):
    model  = one greedy generation of `new_tokens` tokens (its prefill included);
    tokens/s = b * new_tokens / p50 of that call.
Speedups > 1 mean the row is faster (for decode: more tokens/s). Before each measurement every function
runs once untimed (torch.compile traces there; it is `warmup_s`). Peak memory: the largest, over the
measurements, of the row's first calls' peak above the level before them (CUDA: max_memory_allocated; CPU:
VmHWM - VmRSS, as the classifier benchmark), read before the baseline's calls run.
"""

from __future__ import annotations

import time

from optforge.errors import StageFailure
from optforge.recipe import LMBenchmarkParams
from optforge.stages.base import RowStep, StageContext, StageKind
from optforge.stages.benchmark import METHOD, PAIRED_KEYS, RUN_KEYS, _first_call, _stats, measure_paired

PROMPT_SCOPES = {"model": "prefill", "e2e": "ttft"}


def prompt_texts(texts: list[str], tokenizer, length: int, count: int, seed: int) -> list[str]:
    """`count` prompts of at least `length` tokens: consecutive eval texts joined with spaces, starting at
    seeded positions."""
    import random

    rng = random.Random(seed * 1_000_003 + length * 7 + count)
    out = []
    for _ in range(count):
        i = rng.randrange(len(texts))
        parts, n = [], 0
        for j in range(len(texts)):
            t = texts[(i + j) % len(texts)]
            parts.append(t)
            n += len(tokenizer(t, add_special_tokens=False)["input_ids"])
            if n >= length:
                break
        if n < length:
            raise StageFailure(f"the eval split has {n} tokens in all, fewer than the prompt length {length}")
        out.append(" ".join(parts))
    return out


def run(ctx: StageContext) -> dict:
    from optforge.artifacts import load_runnable
    from optforge.lm.train import read_split
    from optforge.stages.benchmark import _threads
    from optforge.stages.data import EVAL_FILE

    params: LMBenchmarkParams = ctx.params
    texts = read_split(ctx.inputs["data"], EVAL_FILE)
    with _threads(params.threads):
        t0 = time.perf_counter()
        row = load_runnable(ctx.inputs["model"], ctx.device, params.precision, verify=False)
        load_s = time.perf_counter() - t0
        base = None
        if "baseline" in ctx.inputs:
            base = load_runnable(ctx.inputs["baseline"], ctx.device, params.baseline_precision or "fp32", verify=False)
        return benchmark_lm(row, base, texts, params, load_s, ctx.log)


def benchmark_lm(row, base, texts: list[str], params: LMBenchmarkParams, load_s: float, log=print) -> dict:
    import torch

    from optforge.stages.benchmark import _PeakMemory, _sync_fn, benchmark_device_info

    limit = getattr(row.model.config, "max_position_embeddings", None)
    longest = max(params.prompt_lengths) + params.new_tokens
    if limit is not None and longest > limit:
        raise StageFailure(f"prompt length {max(params.prompt_lengths)} + {params.new_tokens} new tokens exceeds "
                           f"the model's {limit} positions")
    sync = _sync_fn(row.device)
    mem = _PeakMemory(row.device)
    peak = [0.0, 0.0]  # the row's peak above the level before its first calls, and the absolute peak
    sides = {"row": row} | ({"base": base} if base is not None else {})
    warmup_s = 0.0
    prompts: dict[str, dict] = {}
    for length in params.prompt_lengths:
        text = prompt_texts(texts, row.tokenizer, length, 1, params.seed)
        fns = {}
        for side, r in sides.items():
            ids = r.encode(text, length)
            fns[(side, "model")] = lambda r=r, ids=ids: r.prefill(ids)
            fns[(side, "e2e")] = lambda r=r, text=text, length=length: r.first_token(text, length)
        warmup_s += _warm(fns, f"prompt {length}", mem, peak)
        prompts[str(length)] = _measure(fns, params, 1, length, PROMPT_SCOPES, sync)
        log(_line(f"prompt {length}", prompts[str(length)], PROMPT_SCOPES))
    decode: dict[str, dict] = {}
    first = min(params.prompt_lengths)
    for b in params.batch_sizes:
        batch_texts = prompt_texts(texts, row.tokenizer, first, b, params.seed)
        fns = {}
        for side, r in sides.items():
            ids = r.encode(batch_texts, first)
            fns[(side, "model")] = lambda r=r, ids=ids: r.generate(ids, params.new_tokens)
        warmup_s += _warm(fns, f"decode at batch {b}", mem, peak)
        entry = _measure(fns, params, b, b, {"model": "decode"}, sync)
        for key in ("decode", "baseline_decode"):
            if entry.get(key):
                entry[key.replace("decode", "tokens_per_s")] = b * params.new_tokens / (entry[key]["p50"] / 1000.0)
        decode[str(b)] = entry
        rate = f", {entry['tokens_per_s']:.1f} tokens/s" if entry.get("tokens_per_s") else ""
        log(_line(f"decode batch {b}", entry, {"model": "decode"}) + rate)
    peak_above, peak_total = peak
    if str(row.device).startswith("cuda"):
        torch.cuda.empty_cache()
    total, nonzero = row.param_count()
    return {"device": benchmark_device_info(row.device), "threads": torch.get_num_threads(),
            "params": int(total), "nonzero_params": int(nonzero), "size_mb": row.size_bytes / 1e6,
            "load_s": load_s, "warmup_s": warmup_s, "peak_mem_mb": peak_above, "peak_mem_total_mb": peak_total,
            "peak_mem_method": mem.method, "precision": row.precision, "description": row.description,
            "modules_quantized": row.meta.get("modules_quantized"), "modules_skipped": row.meta.get("modules_skipped"),
            "new_tokens": params.new_tokens, "decode_prompt_length": first, "method": METHOD,
            "baseline": ({"config": params.baseline_config, "precision": params.baseline_precision}
                         if base is not None else None),
            "prompts": prompts, "decode": decode}


def _warm(fns: dict, what: str, mem, peak: list) -> float:
    """The first call of every function (compilation, lazy init; a deterministic failure -> StageFailure),
    the row's first: its peak memory is read before the baseline's calls run (as the classifier benchmark)."""
    total = 0.0
    mem.reset()
    for side in ("row", "base"):
        for (s, scope), fn in fns.items():
            if s == side:
                total += _first_call(fn, f"{'baseline ' if side == 'base' else ''}{scope} at {what}")
        if side == "row":
            above, absolute = mem.peak()
            peak[0], peak[1] = max(peak[0], above), max(peak[1], absolute)
    return total


def _measure(fns: dict, params, batch: int, seed_part: int, names: dict, sync) -> dict:
    """One paired measurement -> {name: STATS, baseline_<name>: STATS, paired: {name: ...}, paired_run|run}."""
    res = measure_paired(fns, params, seed_part, sync)
    entry: dict = {"call_s": {names[s]: _median(res["warmup_times"].get("row", {}).get(s)) for s in names}}
    for scope, name in names.items():
        entry[name] = _stats(res["times"].get("row", {}).get(scope), batch, params, None, None)
        if "base" in res["times"]:
            entry[f"baseline_{name}"] = _stats(res["times"]["base"].get(scope), batch, params, None, None)
    run_info = {k: res[k] for k in RUN_KEYS}
    if res["compare"]:
        entry["paired"] = {names[s]: {k: c.get(k) for k in PAIRED_KEYS} for s, c in res["compare"].items()}
        entry["paired_run"] = run_info | {k: res[k] for k in ("ci_width", "confidence", "min_rounds")}
    else:
        entry["run"] = run_info
    return entry


def _median(values) -> float | None:
    from optforge.bench import percentile

    return percentile(values, 50) if values else None


def _line(what: str, entry: dict, names: dict) -> str:
    parts = [f"{n} p50 {entry[n]['p50']:.2f} ms" if entry.get(n) else
             f"{n}: no timed call within max_seconds (a warm-up call took {entry['call_s'][n]:.2f} s; raise "
             f"benchmark.max_seconds)" for n in names.values()]
    for n, c in (entry.get("paired") or {}).items():
        if c.get("speedup") is not None:
            ci = f" ({c['ci_low']:.2f}-{c['ci_high']:.2f})" if c.get("ci_low") is not None else ""
            parts.append(f"{n} speedup {c['speedup']:.2f}x{ci}")
    return f"  {what}: " + ", ".join(parts)


KIND = StageKind(kind="lm_benchmark", version="1", params_model=LMBenchmarkParams, run=run, hardware_bound=True,
                 measures_time=True, task="causal-lm",
                 row=RowStep(order=110, measure=True, applies=lambda recipe, c: True,
                             params=LMBenchmarkParams.for_row, needs_data=True, compares=True, stage="benchmark"))
