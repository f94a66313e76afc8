"""Which configuration to serve. Pure: rows or metrics in, a decision (and why) out.

"best" means what the report means by it: `optforge.report.verdict` judges the rows and picks the
best ready one, so the served row is the report's best row. When no row is ready, the fallback is the
fastest row (the report's ranking) whose accuracy is within the accuracy gate -- the baseline always
is -- and the decision says why. `optforge serve` (serve/launch.py) and the serve_benchmark stage
both decide here: the stage from its inputs' metrics, the command from the cached results.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

from optforge.errors import StageFailure
from optforge.report import verdict
from optforge.report.results import measured_row

BEST_WHY = ("the report's best ready configuration (highest low end of its end-to-end speedup interval over "
            "batch sizes)")


class Choice(NamedTuple):
    row: Optional[dict]  # None: no row was built
    why: str  # the whole reason, as the serving section of the report shows it
    fallback: Optional[str]  # None for a ready row, else the rule that picked a row that is not ready


def verdict_rows(configs: list[str], input_metrics: Mapping[str, dict], baseline: str, gates) -> list[dict]:
    """Judged rows (with `verdict`, `speedup_min`, `accuracy_delta`) for `configs`, from the metrics
    of their evaluate:<c> / benchmark:<c> inputs. A config whose metrics are absent is `missing`."""
    rows = []
    for c in configs:
        ev, bm = input_metrics.get(f"evaluate:{c}"), input_metrics.get(f"benchmark:{c}")
        absent = [f"{stage}:{c}" for stage, m in (("evaluate", ev), ("benchmark", bm)) if not m]
        status, reason = ("missing", f"not built: {', '.join(absent)}") if absent else ("ok", None)
        rows.append(measured_row(c, status, reason, ev or {}, bm or {}, batch_sizes=[]))
    verdict.judge_rows(rows, baseline, gates)
    return rows


def choose_row(rows: list[dict], baseline: str, gates) -> Choice:
    """The row to serve among judged rows: the best ready one, else the fastest within the accuracy
    gate, else (no baseline to judge by) the most accurate built one, else none."""
    best = verdict.pick_best(rows)
    if best is not None:
        return Choice(next(r for r in rows if r["name"] == best), BEST_WHY, None)
    fallback = _fastest_within_accuracy_gate(rows, gates)
    if fallback is not None:
        return Choice(fallback, f"no configuration is ready (each row's verdict is in the table); serving the "
                                f"fastest one within the accuracy gate (drop <= {gates.max_accuracy_drop:g} pts), "
                                f"whose verdict is: {fallback['verdict']}",
                      "the fastest one within the accuracy gate")
    built = [r for r in rows if r["status"] == "ok"]
    if not built:
        return Choice(None, "", None)
    most_accurate = max(built, key=lambda r: r["accuracy"] if r["accuracy"] is not None else float("-inf"))
    return Choice(most_accurate, f"the baseline {baseline!r} was not built, so no speedup or accuracy gate can be "
                                 "judged; serving the most accurate built configuration",
                  f"the most accurate built one (the baseline {baseline!r} was not built)")


def choose_config(requested: str, configs: list[str], input_metrics: Mapping[str, dict], baseline: str,
                  gates) -> dict:
    """{"requested", "config", "verdict", "why"}; StageFailure when nothing can be served."""
    if requested != "best":
        if requested not in configs:
            raise StageFailure(f"config {requested!r} is not among this stage's inputs ({', '.join(configs)})")
        return {"requested": requested, "config": requested, "verdict": None, "why": "named in the recipe"}
    rows = verdict_rows(configs, input_metrics, baseline, gates)
    row, why, _ = choose_row(rows, baseline, gates)
    if row is None:
        raise StageFailure("no configuration was built successfully, so there is nothing to serve: "
                           + "; ".join(f"{r['name']}: {r['verdict']}" for r in rows))
    return {"requested": "best", "config": row["name"], "verdict": row["verdict"], "why": why}


def _fastest_within_accuracy_gate(rows: list[dict], gates) -> Optional[dict]:
    ok = [(verdict.ranking_key(r, i), r) for i, r in enumerate(rows) if r["status"] == "ok"
          and (r["is_baseline"] or (r["accuracy_delta"] is not None
                                    and verdict.accuracy_drop(r) <= gates.max_accuracy_drop))]
    return max(ok, key=lambda kr: kr[0])[1] if ok else None
