"""Timing and statistics helpers for the benchmark stage. Pure: no torch, no I/O.

Conventions (documented in docs/results-schema.md, asserted in tests/test_bench.py):

- percentiles use linear interpolation between closest ranks, numpy's default ("linear"):
  the q-th percentile of n sorted values sits at index q/100 * (n - 1);
- `std` is the population standard deviation (ddof=0, numpy's default) and `cv` = std / mean;
- `spread` = (p75 - p25) / p50, the interquartile range relative to the median (0 when p50 is 0).
  A few outliers (a host-scheduling hiccup on a sub-millisecond call) move cv a lot and spread hardly
  at all, so spread says whether the median -- which throughput and speedups use -- is trustworthy;
  outliers are what p99 reports;
- throughput = batch_size / p50 (samples per second at the median call). The median, not the mean,
  so one call stalled by a neighbour on a shared machine does not move it; `throughput_mean`
  (batch_size / mean = total samples over total timed seconds) is recorded next to it;
- speedup = baseline time / this time (> 1 means faster than the baseline); the benchmark stage's
  speedups are paired ratios of medians with intervals (optforge.paired);
- `measure` boxes one function's measurement, warm-up included (the benchmark stage boxes a whole batch
  size, every scope of the row and the baseline, with `paired.measure_paired`); STATS with fewer than
  `min_runs` timed calls say `"capped": true` next to their `runs` (`summarize`).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    xs = sorted(values)
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of an empty sequence")
    return math.fsum(values) / len(values)


def std(values: Sequence[float]) -> float:
    """Population standard deviation (ddof=0)."""
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / len(values))


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation std / mean (0 for a constant series; inf for a zero mean)."""
    m = mean(values)
    if m == 0:
        return 0.0 if std(values) == 0 else math.inf
    return std(values) / m


def spread(values: Sequence[float]) -> float:
    """Interquartile range relative to the median, (p75 - p25) / p50 (0 when the median is 0)."""
    p50 = percentile(values, 50)
    return (percentile(values, 75) - percentile(values, 25)) / p50 if p50 else 0.0


def throughput(batch_size: int, seconds: float) -> float:
    """Samples per second for a batch that takes `seconds`."""
    if seconds <= 0:
        raise ValueError(f"batch time must be > 0, got {seconds}")
    return batch_size / seconds


def speedup(baseline: Optional[float], this: Optional[float]) -> Optional[float]:
    """baseline / this for two latencies (> 1: this is faster); None when either is missing or <= 0."""
    if baseline is None or this is None or baseline <= 0 or this <= 0:
        return None
    return baseline / this


def pct_of_peak(flops: Optional[float], seconds: float, peak_flops: Optional[float]) -> Optional[float]:
    """Achieved FLOP/s as a percentage of `peak_flops`; None when either is unknown."""
    if flops is None or peak_flops is None or peak_flops <= 0 or seconds <= 0:
        return None
    return 100.0 * flops / seconds / peak_flops


def summarize(times_s: Sequence[float], batch_size: int, min_runs: Optional[int] = None) -> dict:
    """The STATS block of the benchmark metrics (docs/ARCHITECTURE.md) from per-call times in seconds.
    Latencies are reported in milliseconds. `pct_peak` is filled in by the caller (it needs FLOPs).
    With `min_runs`, `capped` says whether the time box stopped the measurement short of it."""
    ms = [t * 1000.0 for t in times_s]
    m = mean(ms)
    p50 = percentile(ms, 50)
    stats = {
        "p25": percentile(ms, 25),
        "p50": p50,
        "p75": percentile(ms, 75),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "mean": m,
        "std": std(ms),
        "min": min(ms),
        "max": max(ms),
        "cv": cv(ms),
        "spread": spread(ms),
        "throughput": throughput(batch_size, p50 / 1000.0),
        "throughput_mean": throughput(batch_size, m / 1000.0),
        "runs": len(ms),
        "pct_peak": None,
    }
    if min_runs is not None:
        stats["capped"] = len(ms) < min_runs
    return stats


def measure(fn: Callable[[], object], *, warmup: int, max_seconds: float,
            sync: Optional[Callable[[], None]] = None, clock: Callable[[], float] = time.perf_counter,
            max_runs: int = 100_000) -> tuple[list[float], float]:
    """Time `fn` inside a box of `max_seconds`, warm-up included. Returns (per-call seconds, warm-up seconds).

    Warm-up: up to `warmup` untimed calls, stopping early once half the box is used. Then timed calls
    until the box is spent (capped at `max_runs`). A call is started only while time is left, so the
    whole measurement takes at most `max_seconds` plus one call -- except that at least one warm-up call
    (when `warmup` > 0) and one timed call always run: a 7.5 s call in a 2 s box costs 15 s, not
    (warmup + min_runs) x 7.5 s. The runs a trustworthy row wants (`min_runs`) never extend the box:
    `summarize(times, batch_size, min_runs)` flags a row that got fewer as `capped`.
    `sync` (e.g. torch.cuda.synchronize) runs after every warm-up call and before starting and before
    stopping the clock of every timed call, so asynchronous device work is inside the measurement."""
    sync = sync or (lambda: None)
    t0 = clock()
    for i in range(warmup):
        if i and clock() - t0 >= max_seconds / 2:
            break
        fn()
        sync()
    warmup_s = clock() - t0
    times: list[float] = []
    while len(times) < max_runs and (not times or clock() - t0 < max_seconds):
        sync()
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return times, warmup_s
