"""A configuration's verdict: is it ready to ship, and if not, why. Pure: plain dicts, no torch, no I/O.

One rule for every reader: the report (`results.assemble`), `optforge serve --config best` and the
serve_benchmark stage (`serve.choose`) all call `judge` on rows made by `results.measured_row`.

A row here is a dict with `name`, `status` ("ok" | "failed" | "skipped" | "missing"), `reason`,
`accuracy` and the per-batch blocks `latency_ms`, `e2e_latency_ms`, `cv`, `spread` (see
docs/results-schema.md); the baseline is a row of the same shape.

Verdict rules (a value exactly at a threshold passes):
  failed: <stage>: <reason>          a stage on the configuration's path failed (nothing else checked)
  skipped: ... / missing: ...        it was not built
  accuracy drop X > G                baseline accuracy - this accuracy, in points, above max_accuracy_drop
  slower than baseline (S at b)      end-to-end p50 speedup < 1 at some batch size (worst one named)
  speedup S < G at batch b           1 <= speedup < min_speedup at the worst batch size
  unstable timing (IQR X% of median > G% at batch b, scope)
                                     the largest spread ((p75 - p25) / p50) over batch sizes and scopes
                                     above max_spread; metrics without a spread are not gated
  unstable timing (cv X% > G% at batch b, scope)
                                     the largest cv over batch sizes and scopes above max_cv (only
                                     when max_cv is set)
Several reasons are joined with "; ". No reason -> "ready". The baseline row's verdict is "baseline"
(plus "; unstable timing ..." when its own timing is unstable, since every speedup divides by it).
Comparisons use values rounded to 6 decimals, so float noise (0.9 - 0.89 = 0.0100000000000000009)
does not fail a gate that the printed numbers pass.
"""

from __future__ import annotations

from typing import Optional

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
    `GatesSpec`): {"is_baseline", "accuracy_delta" (points), "speedup" (end-to-end p50, baseline /
    this, per batch), "model_speedup", "speedup_scope", "speedup_min", "reasons", "verdict"}."""
    out = comparison(row, base)
    if row["status"] != "ok":
        reasons = [f"{row['status']}: {row['reason']}" if row["status"] != "missing" else row["reason"]]
        return out | {"reasons": reasons, "verdict": reasons[0]}
    reasons = gate_reasons(row | out, base, gates)
    if out["is_baseline"]:
        return out | {"reasons": reasons, "verdict": "; ".join(["baseline"] + reasons)}
    return out | {"reasons": reasons, "verdict": "; ".join(reasons) or "ready"}


def comparison(row: dict, base: Optional[dict]) -> dict:
    """accuracy_delta (points), speedup (end-to-end p50, baseline / this; model p50 when either side
    has no end-to-end numbers), model_speedup, speedup_scope, speedup_min."""
    acc, bacc = row["accuracy"], base and base["accuracy"]
    out = {"is_baseline": base is not None and row["name"] == base["name"],
           "accuracy_delta": rounded((acc - bacc) * 100, 4) if acc is not None and bacc is not None else None,
           "speedup": {}, "model_speedup": {}, "speedup_scope": "e2e", "speedup_min": None}
    if base is None:
        return out
    use_e2e = bool(row["e2e_latency_ms"]) and bool(base["e2e_latency_ms"])
    out["speedup_scope"] = "e2e" if use_e2e else "model"
    for b in row["latency_ms"]:
        sm = _ratio(_p50(base, b, "model"), _p50(row, b, "model"))
        se = _ratio(_p50(base, b, "e2e"), _p50(row, b, "e2e")) if use_e2e else sm
        if sm is not None:
            out["model_speedup"][b] = sm
        if se is not None:
            out["speedup"][b] = se
    out["speedup_min"] = min(out["speedup"].values()) if out["speedup"] else None
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
    """Why a built, compared row (one with `is_baseline`, `accuracy_delta`, `speedup`) is not ready
    (empty list: ready). See the module docstring."""
    reasons = []
    if base is None or base["status"] != "ok":
        reasons.append("no baseline to compare against (baseline not built)")
    elif not row["is_baseline"]:
        drop = accuracy_drop(row)
        if drop is not None and drop > gates.max_accuracy_drop:
            a, g = _fmt_pair(drop, gates.max_accuracy_drop, 1)
            reasons.append(f"accuracy drop {a} > {g}")
        if row["speedup"]:
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
    """Higher is better: the minimum speedup over batch sizes, then accuracy, then earlier in the
    recipe (`position`: the row's index)."""
    return (row["speedup_min"] if row["speedup_min"] is not None else float("-inf"),
            row["accuracy"] if row["accuracy"] is not None else float("-inf"), -position)


def pick_best(rows: list[dict]) -> Optional[str]:
    """The ready row that ranks highest (`ranking_key`); None when no row is ready."""
    ready = [(ranking_key(r, i), r["name"]) for i, r in enumerate(rows) if r["verdict"] == "ready"]
    return max(ready)[1] if ready else None
