"""Which configuration the serve_benchmark stage serves. Pure: metrics in, a decision (and why) out.

"best" means what the report means by it: the verdicts and `pick_best` of `optforge.report.results`
run on the evaluate/benchmark metrics the stage got as inputs, so the served row is the report's best
row. When no row is ready, the fallback is the fastest row (highest minimum end-to-end speedup) whose
accuracy is within the accuracy gate -- the baseline always is -- and the decision says why.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Mapping, Optional

from optforge.errors import StageFailure
from optforge.report import results as report_results


def _rows_recipe(configs: list[str], batch_sizes: list[int]):
    """The few recipe attributes `report.results.build_rows` reads, for rows made from metrics alone
    (a stage sees metrics, not the recipe). Model names do not enter verdicts."""
    return SimpleNamespace(
        quantize=[], prune=[], distill=None,
        configs=[SimpleNamespace(name=c, model="teacher", precision="fp32", quantize=None, compile="none")
                 for c in configs],
        benchmark=SimpleNamespace(batch_sizes=batch_sizes))


def verdict_rows(configs: list[str], input_metrics: Mapping[str, dict], baseline: str, gates) -> list[dict]:
    """Report rows (with `verdict`, `speedup_min`, `accuracy_delta`) for `configs`, from the metrics
    of their evaluate:<c> / benchmark:<c> inputs. A config whose metrics are absent is `missing`."""
    results, batch_sizes = {}, set()
    for c in configs:
        for stage in ("evaluate", "benchmark"):
            m = input_metrics.get(f"{stage}:{c}")
            results[f"{stage}:{c}"] = ({"status": "ok", "metrics": m, "reason": None} if m
                                       else {"status": "missing", "metrics": {}, "reason": "not built"})
        batch_sizes |= {int(b) for b in (input_metrics.get(f"benchmark:{c}") or {}).get("batches", {})}
    recipe = _rows_recipe(configs, sorted(batch_sizes) or [1])
    rows = report_results.build_rows(recipe, None, results)
    report_results.add_comparisons(rows, baseline)
    report_results.add_verdicts(rows, baseline, gates)
    return rows


def choose_config(requested: str, configs: list[str], input_metrics: Mapping[str, dict], baseline: str,
                  gates) -> dict:
    """{"requested", "config", "verdict", "why"}; StageFailure when nothing can be served."""
    if requested != "best":
        if requested not in configs:
            raise StageFailure(f"config {requested!r} is not among this stage's inputs ({', '.join(configs)})")
        return {"requested": requested, "config": requested, "verdict": None, "why": "named in the recipe"}
    rows = verdict_rows(configs, input_metrics, baseline, gates)
    best = report_results.pick_best(rows)
    if best is not None:
        row = next(r for r in rows if r["name"] == best)
        return {"requested": "best", "config": best, "verdict": row["verdict"],
                "why": "the report's best ready configuration (highest minimum end-to-end speedup)"}
    fallback = _fastest_within_accuracy_gate(rows, gates)
    if fallback is None and any(r["status"] == "ok" for r in rows):  # no baseline to judge accuracy by
        fallback = max((r for r in rows if r["status"] == "ok"),
                       key=lambda r: r["accuracy"] if r["accuracy"] is not None else float("-inf"))
        return {"requested": "best", "config": fallback["name"], "verdict": fallback["verdict"],
                "why": f"the baseline {baseline!r} was not built, so no speedup or accuracy gate can be "
                       "judged; serving the most accurate built configuration"}
    if fallback is None:
        raise StageFailure("no configuration was built successfully, so there is nothing to serve: "
                           + "; ".join(f"{r['name']}: {r['verdict']}" for r in rows))
    return {"requested": "best", "config": fallback["name"], "verdict": fallback["verdict"],
            "why": (f"no configuration is ready (each row's verdict is in the table); serving the fastest "
                    f"one within the accuracy gate (drop <= {gates.max_accuracy_drop:g} pts), whose "
                    f"verdict is: {fallback['verdict']}")}


def _fastest_within_accuracy_gate(rows: list[dict], gates) -> Optional[dict]:
    ok = [r for r in rows if r["status"] == "ok"
          and (r["is_baseline"] or (r["accuracy_delta"] is not None
                                    and round(-r["accuracy_delta"], 6) <= gates.max_accuracy_drop))]
    if not ok:
        return None
    order = {r["name"]: i for i, r in enumerate(rows)}
    return max(ok, key=lambda r: (r["speedup_min"] if r["speedup_min"] is not None else float("-inf"),
                                  r["accuracy"] if r["accuracy"] is not None else float("-inf"),
                                  -order[r["name"]]))
