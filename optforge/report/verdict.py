"""A configuration's verdict: is it ready to ship, and if not, why. Pure: plain dicts, no torch, no I/O.

One rule for every reader: the report (`results.assemble`), `optforge serve --config best` and the
serve_benchmark stage (`serve.choose`) all call `judge` on rows made by `results.measured_row`.

A row here is a dict with `name`, `status` ("ok" | "failed" | "skipped" | "missing"), `reason`,
`accuracy`, the per-batch blocks `latency_ms`, `e2e_latency_ms`, `cv`, `spread` and, from a paired
benchmark, `paired` / `paired_run` / `compared_with` (see docs/results-schema.md); the baseline is a row
of the same shape.

The speedup of a row is the paired one: measured in the row's own benchmark stage, interleaved with the
baseline's model (median of the baseline's calls / median of the row's, with a bootstrap interval),
end to end where both sides have that scope, else model. Rows whose metrics predate it (no `paired`)
fall back to the cross-stage ratio of the two rows' p50s (`speedup_method: "cross-stage"`, no interval).

Verdict rules (a value exactly at a threshold passes; S (lo-hi) is a speedup and its interval):
  failed: <stage>: <reason>          a stage on the configuration's path failed (nothing else checked)
  skipped: ... / missing: ...        it was not built
  accuracy drop X > G                baseline accuracy - this accuracy, in points, above max_accuracy_drop
  slower than baseline (S× (lo–hi) at batch b)
                                     the interval's high end < 1 (and its low end < min_speedup) at some
                                     batch size (the slowest one named)
  inconclusive (±N % at batch b)     the interval's relative half-width is above the benchmark's
                                     `ci_width` and the interval contains min_speedup, at some batch
                                     size (the widest named; not slower): too wide to tell. An interval
                                     wholly above the gate passes, one wholly below it fails, however wide
  inconclusive (too slow: r of m rounds within max_seconds at batch b)
                                     fewer than `min_rounds` rounds fitted in the time box: no interval
  speedup S× (lo–hi) < G× at batch b the interval's low end is below min_speedup and it is narrow (or
                                     wholly below the gate) (the lowest low end named)
  cross-stage fallback: slower than baseline (S at b) / speedup S < G at batch b, on the p50 ratio
  unstable timing (IQR X% of median > G% at batch b, scope)
                                     only when max_spread is set: the largest spread ((p75 - p25) / p50)
                                     over batch sizes and scopes above it; metrics without a spread are
                                     not gated
  unstable timing (cv X% > G% at batch b, scope)
                                     only when max_cv is set: the largest cv above it
Several reasons are joined with "; ". No reason -> "ready". The baseline row's verdict is "baseline"
(plus "; unstable timing ..." when a stability gate is set and its own timing fails it).
Comparisons use values rounded to 6 decimals, so float noise (0.9 - 0.89 = 0.0100000000000000009)
does not fail a gate that the printed numbers pass.
"""

from __future__ import annotations

from typing import Optional

from optforge.report import fmt

ROUND_CMP = 6  # decimals for gate comparisons


def rounded(x: Optional[float], nd: int) -> Optional[float]:
    """`x` rounded to `nd` decimals; None stays None and -0.0 becomes 0.0 (no "-0.0" in the JSON)."""
    if x is None:
        return None
    v = round(float(x), nd)
    return 0.0 if v == 0 else v


def judge_rows(rows: list[dict], baseline: str, gates) -> None:
    """`judge` every row against the row named `baseline` (none of that name: nothing to compare
    against), adding the result to each row."""
    base = next((r for r in rows if r["name"] == baseline), None)
    for row in rows:
        row.update(judge(row, base, gates))


def judge(row: dict, base: Optional[dict], gates) -> dict:
    """The comparison with the baseline row `base` and the verdict of `row` under `gates` (a
    `GatesSpec`): `comparison`'s keys plus "reasons" and "verdict"."""
    out = comparison(row, base)
    if row["status"] != "ok":
        reasons = [f"{row['status']}: {row['reason']}" if row["status"] != "missing" else row["reason"]]
        return out | {"reasons": reasons, "verdict": reasons[0]}
    reasons = gate_reasons(row | out, base, gates)
    if out["is_baseline"]:
        return out | {"reasons": reasons, "verdict": "; ".join(["baseline"] + reasons)}
    return out | {"reasons": reasons, "verdict": "; ".join(reasons) or "ready"}


def comparison(row: dict, base: Optional[dict]) -> dict:
    """accuracy_delta (points); per batch `speedup` (end to end, model when either side lacks that
    scope) and `model_speedup`, with `speedup_ci` / `model_speedup_ci` ({"low", "high"}; only from a
    paired benchmark), `speedup_scope`, `speedup_method` ("paired" | "cross-stage"; None for the
    baseline row and without a baseline), `speedup_min` (over batch sizes) and `speedup_low_min` (the
    lowest interval low end; None unless every batch size has an interval)."""
    acc, bacc = row["accuracy"], base and base["accuracy"]
    out = {"is_baseline": base is not None and row["name"] == base["name"],
           "accuracy_delta": rounded((acc - bacc) * 100, 4) if acc is not None and bacc is not None else None,
           "speedup": {}, "model_speedup": {}, "speedup_ci": {}, "model_speedup_ci": {}, "speedup_scope": "e2e",
           "speedup_method": None, "speedup_min": None, "speedup_low_min": None}
    if base is None:
        return out
    if is_paired(row, base):
        out |= _paired_comparison(row)
    else:
        out |= _cross_stage_comparison(row, base)
        if not out["is_baseline"] and out["speedup"]:
            out["speedup_method"] = "cross-stage"
    out["speedup_min"] = min(out["speedup"].values()) if out["speedup"] else None
    lows = [ci["low"] for ci in out["speedup_ci"].values()]
    if out["speedup_method"] == "paired" and lows and len(lows) == len(row.get("paired_run") or {}):
        out["speedup_low_min"] = min(lows)
    return out


def is_paired(row: dict, base: Optional[dict]) -> bool:
    """Whether `row` was measured in the same run as `base` (its benchmark metrics have `paired`
    blocks against that configuration)."""
    return (base is not None and bool(row.get("paired_run")) and row.get("compared_with") is not None
            and row.get("compared_with") == base["name"])


def _paired_comparison(row: dict) -> dict:
    batches = sorted(row["paired_run"], key=int)
    scope = "e2e" if all("e2e" in (row["paired"].get(b) or {}) for b in batches) else "model"
    out = {"speedup_scope": scope, "speedup_method": "paired", "speedup": {}, "model_speedup": {},
           "speedup_ci": {}, "model_speedup_ci": {}}
    for b in batches:
        for key, sc in (("speedup", scope), ("model_speedup", "model")):
            c = (row["paired"].get(b) or {}).get(sc)
            if c and c.get("speedup") is not None:
                out[key][b] = c["speedup"]
                if c.get("speedup_ci_low") is not None and c.get("speedup_ci_high") is not None:
                    out[f"{key}_ci"][b] = {"low": c["speedup_ci_low"], "high": c["speedup_ci_high"]}
    return out


def _cross_stage_comparison(row: dict, base: dict) -> dict:
    """The fallback for metrics from before the paired benchmark: baseline p50 / this p50, each from
    its own stage."""
    use_e2e = bool(row["e2e_latency_ms"]) and bool(base["e2e_latency_ms"])
    out = {"speedup_scope": "e2e" if use_e2e else "model", "speedup": {}, "model_speedup": {}}
    for b in row["latency_ms"]:
        sm = _ratio(_p50(base, b, "model"), _p50(row, b, "model"))
        se = _ratio(_p50(base, b, "e2e"), _p50(row, b, "e2e")) if use_e2e else sm
        if sm is not None:
            out["model_speedup"][b] = sm
        if se is not None:
            out["speedup"][b] = se
    return out


def _p50(row: dict, b: str, scope: str) -> Optional[float]:
    block = row["e2e_latency_ms" if scope == "e2e" else "latency_ms"].get(b)
    return block["p50"] if block else None


def _ratio(base: Optional[float], this: Optional[float]) -> Optional[float]:
    if base is None or this is None or base <= 0 or this <= 0:
        return None
    return rounded(base / this, 4)


def _fmt_pair(value: float, gate: float, decimals: int, scale: float = 1.0) -> tuple[str, str]:
    """Format value and gate with the fewest decimals (>= `decimals`) that show them different."""
    for d in range(decimals, 7):
        a, g = f"{value * scale:.{d}f}", f"{gate * scale:.{d}f}"
        if a != g:
            return a, g
    return f"{value * scale}", f"{gate * scale}"


def accuracy_drop(row: dict) -> Optional[float]:
    """Points of accuracy lost against the baseline, rounded for comparison (None: not measured)."""
    return None if row["accuracy_delta"] is None else rounded(-row["accuracy_delta"], ROUND_CMP)


def gate_reasons(row: dict, base: Optional[dict], gates) -> list[str]:
    """Why a built, compared row (one with `comparison`'s keys) is not ready (empty list: ready). See
    the module docstring."""
    reasons = []
    if base is None or base["status"] != "ok":
        reasons.append("no baseline to compare against (baseline not built)")
    elif not row["is_baseline"]:
        drop = accuracy_drop(row)
        if drop is not None and drop > gates.max_accuracy_drop:
            a, g = _fmt_pair(drop, gates.max_accuracy_drop, 1)
            reasons.append(f"accuracy drop {a} > {g}")
        if row.get("speedup_method") == "paired":
            reasons += paired_speed_reasons(row, gates.min_speedup)
        elif row["speedup"]:
            worst_b = min(row["speedup"], key=lambda b: (row["speedup"][b], int(b)))
            s = rounded(row["speedup"][worst_b], ROUND_CMP)
            if s < 1.0 and s < gates.min_speedup:
                reasons.append(f"slower than baseline ({s:.2f}x at batch {worst_b})")
            elif s < gates.min_speedup:
                a, g = _fmt_pair(s, gates.min_speedup, 1)
                reasons.append(f"speedup {a}x < {g}x at batch {worst_b}")
    for key, (v, b, scope), gate in unstable_timing(row, gates.max_spread, gates.max_cv):
        a, g = _fmt_pair(v, gate, 0, scale=100)
        what = f"IQR {a}% of median" if key == "spread" else f"cv {a}%"
        reasons.append(f"unstable timing ({what} > {g}% at batch {b}, {scope})")
    return reasons


def _decimals(a: float, b: float, least: int = 2) -> int:
    """The fewest decimals (>= `least`) that print `a` and `b` differently (6 at most)."""
    for d in range(least, 7):
        if f"{a:.{d}f}" != f"{b:.{d}f}":
            return d
    return 6


def paired_speed_reasons(row: dict, min_speedup: float) -> list[str]:
    """The speed reason of a paired row (at most one): slower than baseline, else inconclusive, else
    speedup below the gate; [] when the interval's low end clears `min_speedup` at every batch size.
    Width decides only what the interval cannot: one wider than ±ci_width that contains the gate is
    inconclusive; one that lies wholly above the gate passes and one wholly below it fails, however wide."""
    scope = row["speedup_scope"]
    slower, wide, below = [], [], []
    for b in sorted(row["paired_run"], key=int):
        run = row["paired_run"][b]
        c = (row["paired"].get(b) or {}).get(scope) or {}
        s, lo, hi, hw = (c.get(k) for k in ("speedup", "speedup_ci_low", "speedup_ci_high", "half_width"))
        if run.get("too_slow") or s is None or lo is None or hi is None or hw is None:
            wide.append((float("inf"), b, run))
            continue
        lo_r, hi_r = rounded(lo, ROUND_CMP), rounded(hi, ROUND_CMP)
        if hi_r < 1.0 and lo_r < min_speedup:
            slower.append((s, b, c))
        elif lo_r >= min_speedup:
            continue  # the whole interval clears the gate: decided, however wide
        elif rounded(hw, ROUND_CMP) > run["ci_width"] and hi_r >= min_speedup:
            wide.append((hw, b, run))  # too wide to tell whether the gate holds
        else:
            below.append((lo, b, c))  # narrow, or wide but wholly below the gate
    if slower:
        s, b, c = min(slower, key=lambda x: (x[0], int(x[1])))
        d = _decimals(c["speedup_ci_high"], 1.0)
        return [f"slower than baseline ({fmt.speedup(s, c['speedup_ci_low'], c['speedup_ci_high'], d)} "
                f"at batch {b})"]
    if wide:
        hw, b, run = max(wide, key=lambda x: (x[0], -int(x[1])))
        if hw == float("inf"):
            return [f"inconclusive (too slow: {run.get('rounds', 0)} of {run.get('min_rounds') or 'the minimum'} "
                    f"rounds within max_seconds at batch {b})"]
        a, _ = _fmt_pair(hw, run["ci_width"], 1, scale=100)
        return [f"inconclusive (±{a} % at batch {b})"]
    if below:
        lo, b, c = min(below, key=lambda x: (x[0], int(x[1])))
        d = _decimals(lo, min_speedup)
        return [f"speedup {fmt.speedup(c['speedup'], lo, c['speedup_ci_high'], d)} < {min_speedup:g}× "
                f"at batch {b}"]
    return []


def unstable_timing(row: dict, max_spread: Optional[float],
                    max_cv: Optional[float]) -> list[tuple[str, tuple[float, str, str], float]]:
    """[("spread" | "cv", (value, batch, scope), gate)] for each stability gate the row fails: its worst
    spread above `max_spread`, its worst cv above `max_cv`. A gate of None and a measure the metrics
    lack (older cached benchmarks have no spread) are not checked."""
    out = []
    for key, gate, worst in (("spread", max_spread, worst_spread(row)), ("cv", max_cv, worst_cv(row))):
        if gate is not None and worst is not None and rounded(worst[0], ROUND_CMP) > gate:
            out.append((key, worst, gate))
    return out


def _worst(row: dict, key: str) -> Optional[tuple[float, str, str]]:
    worst = None
    for b, scopes in (row.get(key) or {}).items():
        for scope, v in scopes.items():
            if v is not None and (worst is None or v > worst[0]):
                worst = (v, b, scope)
    return worst


def worst_cv(row: dict) -> Optional[tuple[float, str, str]]:
    """(cv, batch, scope) of the least stable measurement of a row by cv; the first one on ties."""
    return _worst(row, "cv")


def worst_spread(row: dict) -> Optional[tuple[float, str, str]]:
    """(spread, batch, scope) of the least stable measurement of a row by IQR / median; the first one
    on ties; None when no measurement has a spread."""
    return _worst(row, "spread")


def ranking_key(row: dict, position: int) -> tuple:
    """Higher is better: the lowest interval low end over batch sizes (conservative; the minimum
    speedup for a row without intervals), then accuracy, then earlier in the recipe (`position`: the
    row's index)."""
    low = row.get("speedup_low_min")
    speed = low if low is not None else row["speedup_min"]
    return (speed if speed is not None else float("-inf"),
            row["accuracy"] if row["accuracy"] is not None else float("-inf"), -position)


def pick_best(rows: list[dict]) -> Optional[str]:
    """The ready row that ranks highest (`ranking_key`); None when no row is ready."""
    ready = [(ranking_key(r, i), r["name"]) for i, r in enumerate(rows) if r["verdict"] == "ready"]
    return max(ready)[1] if ready else None
