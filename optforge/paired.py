"""Paired, interleaved timing of a row against the baseline, with a bootstrap interval on the speedup.
Pure: no torch, no numpy, no I/O (issue #15). The reference for the method; asserted in tests/test_paired.py.

Why: a speedup divided out of two stages measured minutes apart takes whatever changed in between (a
neighbour, the clock, the page cache) into the ratio, and a per-call spread says how variable the
workload is, not how well its median is known. So both sides are timed in the same process, interleaved,
and the speedup carries a confidence interval.

- **Blocks and rounds.** `fns` maps (side, scope) to a callable: side `row` (the configuration) or `base`
  (the baseline), scope `model`, `pretokenized` or `e2e`, all for one batch size. A *block* is a run of
  consecutive calls of one function; a *round* is one block of every function. Round r visits the scopes
  rotated by r (round 0: model, pretokenized, e2e; round 1: pretokenized, e2e, model; ...) and, within a
  scope, puts `row` first when r % 4 is 0 or 3 and `base` first when it is 1 or 2 (ABBA across rounds), so
  a drift that is linear over a few rounds hits both sides and every scope alike (`round_order`).
- **Warm-up.** Each function gets `warmup` untimed calls (at least 1), one call of each per pass in the
  order of round `i` for pass i, stopping early once a third of the box is used.
- **Calls per block.** Each (side, scope) gets its own count, fixed after warm-up:
  `max(1, min(max_block_calls, round(block_seconds / t)))` with t its median warm-up call time (a row 10x
  faster than the baseline would otherwise get tiny blocks, or the baseline huge ones).
- **Speedup** of a scope = median(all base calls) / median(all row calls), > 1 when the row is faster;
  medians are `bench.percentile(_, 50)` (linear interpolation).
- **Interval.** Bootstrap over rounds: a resample draws as many rounds as were measured (n), with
  replacement, keeping each round's base block and row block together; it pools their calls and takes the
  ratio of the two medians. Resampling whole rounds keeps what the calls of one moment share (a
  neighbour, a clock state) together. `n_boot` resamples from `random.Random(seed)`; the interval is the
  a and 1 - a quantiles of the resampled ratios (`ratio_ci`), where, for `confidence` c:
  - *expanded percentile* (the default; Hesterberg, "What teachers should know about the bootstrap",
    The American Statistician 69(4), 2015): a = Phi(-sqrt(n / (n - 1)) * t_{n-1}((1 + c) / 2)), Phi the
    normal CDF, t_{n-1} the Student t quantile. The plain percentile interval is too narrow over few
    rounds: on lognormal timings (sigma 0.3, 10 calls a block, 300 seeds) a 95 % one held the true
    ratio in 85 % of cases over 4 rounds, 90 % over 6, 93 % over 10; the expanded one in 90 %, 97 %, 96 %
    (the 6-round case is asserted in tests/test_paired.py). a is 0.01 % over 4 rounds, 0.24 % over 6,
    0.9 % over 10, 2.1 % over 50, tending to (1 - c) / 2;
  - *percentile* (`expanded=False`): a = (1 - c) / 2.
- **Seed.** `measure_paired` bootstraps scope c with `mix_seed(seed, c)`; the caller passes a `seed`
  that already mixes the benchmark's seed and the batch size (`mix_seed(seed, batch)`), so a result is
  reproducible from the stage's cache key.
- **Width.** The relative half-width of an interval is `max(hi / ratio - 1, 1 - lo / ratio)`
  (`half_width`); a scope is *conclusive* when it is <= `ci_width`.
- **Adaptive length.** Rounds are added until (a) at least `min_rounds` (even) are done and every scope
  with both sides is conclusive -> `stopped: "width"`; or (b) the box `max_seconds` (warm-up included,
  all scopes and both sides) is spent -> `"time box"`; or (c) `max_rounds` -> `"max rounds"`. A round is
  started only while time is left, so the measurement ends at most one round (after a warm-up pass that
  overran the box: at most that pass) past the box. Fewer than `min_rounds` rounds in the box:
  `too_slow: True` and no interval claimed (`ci_low`/`ci_high`/`half_width` None, `conclusive` False);
  no round at all (a warm-up pass already spent the box): `speedup` None too, and `times` are empty
  (`warmup_times` still say how long a call takes). `min_rounds` defaults to 6: over 4 rounds neither interval
  reaches its stated rate (numbers above), and a low-noise row stops at the first check.
- **When the width is checked.** Only after an even number of rounds (each side then went first equally
  often), first at `min_rounds`; after a check that fails, the next one comes where the half-width,
  shrinking as 1 / sqrt(rounds), should reach `ci_width` -- halfway there, by at least 2 rounds and at
  most doubling the rounds -- so the bootstraps cost a few times one final bootstrap, not one per round.
  `checked_at` lists those rounds. The interval reported is always the one over every round measured.
- **A single side** (the baseline's own stage, or no baseline) uses the same loop: scopes interleaved, no
  speedup, no interval, so no width to stop on: it runs to the box or `max_rounds`.
- **Scope order.** By definition model <= pretokenized <= e2e (each scope contains the one before it).
  Their medians come from the same rounds, so for each side and each consecutive pair `scope_order`
  gives the ratio median(outer) / median(inner) with its bootstrap interval over rounds (`ratio_ci`,
  seeded with `mix_seed(seed, side, inner, outer)`); the order *holds within the interval* when the
  interval's high end is >= 1, and is *broken* only when the whole interval is below 1 (the outer scope
  measurably faster than the scope it contains). Fewer than `min_rounds` rounds: no interval, `holds` None.
- `sync` (e.g. torch.cuda.synchronize) runs before starting and before stopping the clock of every call,
  warm-up included, so asynchronous device work is inside the measurement.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from statistics import NormalDist
from typing import Callable, Mapping, Optional, Sequence

from optforge import bench

SIDES = ("row", "base")
SCOPES = ("model", "pretokenized", "e2e")

Key = tuple[str, str]  # (side, scope)


def round_order(r: int, scopes: Sequence[str], sides: Sequence[str]) -> list[tuple[str, str]]:
    """The (side, scope) blocks of round r, in order: the scopes rotated by r; within each scope the sides
    in the given order when r % 4 is 0 or 3 (with `SIDES`: `row` first), reversed when it is 1 or 2."""
    if r < 0:
        raise ValueError(f"round must be >= 0, got {r}")
    scopes = list(scopes)
    k = r % len(scopes) if scopes else 0
    ordered = list(sides) if r % 4 in (0, 3) else list(sides)[::-1]
    return [(side, scope) for scope in scopes[k:] + scopes[:k] for side in ordered]


def mix_seed(*parts: object) -> int:
    """A deterministic 64-bit seed from `parts` (the same in every process, unlike `hash`)."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _median(values: Sequence[float]) -> float:
    return bench.percentile(values, 50)


def _pooled(blocks: Sequence[Sequence[float]]) -> list[float]:
    pool: list[float] = []
    for block in blocks:
        pool += block
    return pool


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile, by the Cornish-Fisher expansion in the normal quantile (Abramowitz & Stegun
    26.7.5): within 0.004 of the exact value at p = 0.975 for df >= 3, exact to 1e-3 from df 5."""
    z = NormalDist().inv_cdf(p)
    v = float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def interval_tail(confidence: float, rounds: int, expanded: bool = True) -> float:
    """The tail a: the interval is the a and 1 - a quantiles of the bootstrap ratios (module docstring)."""
    alpha = (1 - confidence) / 2
    if not expanded:
        return alpha
    t = t_quantile(1 - alpha, rounds - 1) * math.sqrt(rounds / (rounds - 1))
    return NormalDist().cdf(-t)


def bootstrap_ratios(base_blocks: Sequence[Sequence[float]], row_blocks: Sequence[Sequence[float]], *,
                     n_boot: int = 1000, seed: int = 0) -> list[float]:
    """The `n_boot` resampled ratios `ratio_ci` takes its interval from: each draws len(row_blocks) rounds
    with replacement from `random.Random(seed)` and divides the median of their pooled base calls by that of
    their pooled row calls. Needs >= 2 rounds, non-empty blocks and row calls > 0 (else ValueError)."""
    n = len(row_blocks)
    if len(base_blocks) != n:
        raise ValueError(f"{len(base_blocks)} base blocks for {n} row blocks: one of each per round")
    if n < 2:
        raise ValueError(f"an interval over rounds needs at least 2 rounds, got {n}")
    if not all(base_blocks) or not all(row_blocks):
        raise ValueError("every block needs at least one call")
    if min(min(block) for block in row_blocks) <= 0:
        raise ValueError("row call times must be > 0")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    # Sorted blocks make each pooled resample a concatenation of sorted runs, which sorted() merges fast.
    rounds = [(sorted(b), sorted(r)) for b, r in zip(base_blocks, row_blocks)]
    rng = random.Random(seed)
    ratios = []
    for _ in range(n_boot):
        base: list[float] = []
        row: list[float] = []
        for b, r in rng.choices(rounds, k=n):
            base += b
            row += r
        ratios.append(_median(base) / _median(row))
    return ratios


def ratio_ci(base_blocks: Sequence[Sequence[float]], row_blocks: Sequence[Sequence[float]], *,
             confidence: float = 0.95, n_boot: int = 1000, seed: int = 0,
             expanded: bool = True) -> tuple[float, float, float]:
    """(ratio, lo, hi): median(base calls) / median(row calls) and its bootstrap interval over rounds
    (base_blocks[i] and row_blocks[i] are round i's blocks, resampled together); expanded percentile unless
    `expanded` is False (module docstring). Needs >= 2 rounds, non-empty blocks and row calls > 0 (else
    ValueError). The same input and seed give the same interval."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ratios = bootstrap_ratios(base_blocks, row_blocks, n_boot=n_boot, seed=seed)
    ratio = _median(_pooled(base_blocks)) / _median(_pooled(row_blocks))
    tail = 100 * interval_tail(confidence, len(row_blocks), expanded)
    return ratio, bench.percentile(ratios, tail), bench.percentile(ratios, 100 - tail)


def half_width(ratio: float, lo: float, hi: float) -> float:
    """The interval's relative half-width, max(hi / ratio - 1, 1 - lo / ratio)."""
    return max(hi / ratio - 1, 1 - lo / ratio)


def _block_calls(t: float, block_seconds: float, max_block_calls: int) -> int:
    if t <= 0:
        return max_block_calls
    return max(1, min(max_block_calls, round(block_seconds / t)))


def _next_check(rounds: int, worst: float, ci_width: float) -> int:
    """The round of the next width check after one at `rounds` found a half-width of `worst`."""
    if ci_width <= 0 or math.isinf(worst):
        step = rounds
    else:
        need = rounds * (worst / ci_width) ** 2  # the half-width shrinks as 1 / sqrt(rounds)
        step = min(rounds, max(2, math.ceil((need - rounds) / 2)))
    return rounds + step + step % 2


def _compare(blocks: Mapping[Key, list[list[float]]], scope: str, rounds: int, *, min_rounds: int,
             ci_width: float, confidence: float, n_boot: int, seed: int, expanded: bool) -> dict:
    row, base = blocks[("row", scope)], blocks[("base", scope)]
    entry = {"speedup": None, "ci_low": None, "ci_high": None, "half_width": None, "conclusive": False,
             "blocks": rounds, "calls_row": sum(map(len, row)), "calls_base": sum(map(len, base)),
             "seed": mix_seed(seed, scope)}
    if rounds:
        entry["speedup"] = _median(_pooled(base)) / _median(_pooled(row))
    if rounds >= min_rounds:
        ratio, lo, hi = ratio_ci(base, row, confidence=confidence, n_boot=n_boot, seed=entry["seed"],
                                 expanded=expanded)
        hw = half_width(ratio, lo, hi)
        entry.update(speedup=ratio, ci_low=lo, ci_high=hi, half_width=hw, conclusive=hw <= ci_width)
    return entry


def scope_order(blocks: Mapping[Key, list[list[float]]], side: str, rounds: int, *, min_rounds: int,
                confidence: float, n_boot: int, seed: int, expanded: bool) -> list[dict]:
    """For consecutive scopes (model, pretokenized, e2e) both measured on `side`: median(outer) /
    median(inner) (>= 1 by definition) and its interval over rounds; `holds` False only when the interval
    lies wholly below 1, None without an interval (module docstring, "Scope order")."""
    present = [s for s in SCOPES if blocks.get((side, s))]
    out = []
    for inner, outer in zip(present, present[1:]):
        inn, outr = blocks[(side, inner)], blocks[(side, outer)]
        entry = {"inner": inner, "outer": outer, "ratio": None, "ci_low": None, "ci_high": None, "holds": None,
                 "seed": mix_seed(seed, side, inner, outer)}
        if rounds:
            entry["ratio"] = _median(_pooled(outr)) / _median(_pooled(inn))
        if rounds >= min_rounds:
            ratio, lo, hi = ratio_ci(outr, inn, confidence=confidence, n_boot=n_boot, seed=entry["seed"],
                                     expanded=expanded)
            entry.update(ratio=ratio, ci_low=lo, ci_high=hi, holds=hi >= 1.0)
        out.append(entry)
    return out


def _by_side(per_key: Mapping[Key, object]) -> dict:
    out: dict = {}
    for (side, scope), value in per_key.items():
        out.setdefault(side, {})[scope] = value
    return out


def measure_paired(fns: Mapping[tuple[str, str], Callable[[], object]], *, warmup: int = 5,
                   max_seconds: float = 10.0, ci_width: float = 0.05, min_rounds: int = 6,
                   max_rounds: int = 200, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0,
                   block_seconds: float = 0.05, max_block_calls: int = 20,
                   sync: Optional[Callable[[], None]] = None,
                   clock: Callable[[], float] = time.perf_counter, expanded: bool = True) -> dict:
    """Time every (side, scope) function of `fns` interleaved, in rounds of blocks, until the speedup of
    every scope with both sides is known to `ci_width`, or the box or `max_rounds` ends it (module
    docstring). Returns `rounds`, `stopped` ("width", "time box" or "max rounds"), `elapsed_s` (warm-up
    included), `warmup_s`, `too_slow`, `ci_width`, `confidence`, `min_rounds`; `times[side][scope]`, the
    per-call seconds in order (round i's block is `[i*n:(i+1)*n]`, n = `block_calls[side][scope]`);
    `compare[scope]` for each scope with both sides: `speedup`, `ci_low`, `ci_high`, `half_width`,
    `conclusive`, `blocks` (rounds), `calls_row`, `calls_base`, `seed` (its bootstrap's); and
    `warmup_times`, `checked_at`, `ci_s` (seconds spent on intervals, in the box and after it) and
    `interval` ("expanded percentile" or "percentile")."""
    if not fns:
        raise ValueError("nothing to measure")
    for side, scope in fns:
        if side not in SIDES or scope not in SCOPES:
            raise ValueError(f"unknown (side, scope) {(side, scope)!r}: sides {SIDES}, scopes {SCOPES}")
    if min_rounds < 2 or min_rounds % 2:
        raise ValueError(f"min_rounds must be even and >= 2 (ABBA completes), got {min_rounds}")
    if max_rounds < min_rounds:
        raise ValueError(f"max_rounds ({max_rounds}) is below min_rounds ({min_rounds})")
    sync = sync or (lambda: None)
    scopes = [c for c in SCOPES if any((s, c) in fns for s in SIDES)]
    compared = [c for c in scopes if all((s, c) in fns for s in SIDES)]
    settings = dict(min_rounds=min_rounds, ci_width=ci_width, confidence=confidence, n_boot=n_boot, seed=seed,
                    expanded=expanded)

    def order(r: int) -> list[Key]:
        return [key for key in round_order(r, scopes, SIDES) if key in fns]

    def timed(fn: Callable[[], object]) -> float:
        sync()
        start = clock()
        fn()
        sync()
        return clock() - start

    t0 = clock()
    warm: dict[Key, list[float]] = {key: [] for key in fns}
    for i in range(max(1, warmup)):
        if i and clock() - t0 >= max_seconds / 3:
            break
        for key in order(i):
            warm[key].append(timed(fns[key]))
    warmup_s = clock() - t0
    calls = {key: _block_calls(_median(warm[key]), block_seconds, max_block_calls) for key in fns}

    blocks: dict[Key, list[list[float]]] = {key: [] for key in fns}
    rounds, next_check, checked_at, ci_s = 0, min_rounds, [], 0.0
    compare: dict[str, dict] = {}
    while True:
        if rounds >= max_rounds:
            stopped = "max rounds"
            break
        if clock() - t0 >= max_seconds:
            stopped = "time box"
            break
        for key in order(rounds):
            fn, n = fns[key], calls[key]
            blocks[key].append([timed(fn) for _ in range(n)])
        rounds += 1
        if compared and rounds == next_check:
            c0 = clock()
            compare = {c: _compare(blocks, c, rounds, **settings) for c in compared}
            ci_s += clock() - c0
            checked_at.append(rounds)
            worst = max(entry["half_width"] for entry in compare.values())
            if worst <= ci_width:
                stopped = "width"
                break
            next_check = _next_check(rounds, worst, ci_width)
    elapsed_s = clock() - t0
    if compared and (not checked_at or checked_at[-1] != rounds):
        c0 = clock()
        compare = {c: _compare(blocks, c, rounds, **settings) for c in compared}
        ci_s += clock() - c0

    return {
        "rounds": rounds, "stopped": stopped, "elapsed_s": elapsed_s, "warmup_s": warmup_s,
        "too_slow": rounds < min_rounds, "ci_width": ci_width, "confidence": confidence,
        "min_rounds": min_rounds,
        "times": _by_side({key: _pooled(b) for key, b in blocks.items()}),
        "block_calls": _by_side(calls),
        "compare": compare,
        "warmup_times": _by_side(warm),
        "scope_order": {side: scope_order(blocks, side, rounds, min_rounds=min_rounds, confidence=confidence,
                                          n_boot=n_boot, seed=seed, expanded=expanded)
                        for side in SIDES if any(k[0] == side for k in blocks)},
        "checked_at": checked_at,
        "ci_s": ci_s,
        "interval": "expanded percentile" if expanded else "percentile",
    }
