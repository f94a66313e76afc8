"""Verdicts on paired speedups (pure: hand-made benchmark metrics through `results.measured_row`, then
`verdict.judge`): the gate on the interval's low end, slower only when its high end is below 1,
inconclusive when it is too wide to tell (it contains the gate) or the row too slow, the cross-stage fallback for older metrics, and
the ranking on the low end."""

from __future__ import annotations

from optforge.recipe import GatesSpec
from optforge.report.results import measured_row
from optforge.report.verdict import judge, judge_rows, pick_best

GATES = GatesSpec(max_accuracy_drop=1.0, min_speedup=1.5)


def stats(p50: float) -> dict:
    return {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "mean": p50, "std": 0.0, "cv": 0.01, "spread": 0.01,
            "throughput": 1000 / p50, "runs": 40, "pct_peak": None}


def paired(s: float, lo: float | None, hi: float | None) -> dict:
    hw = None if lo is None else max(hi / s - 1, 1 - lo / s)
    return {"speedup": s, "ci_low": lo, "ci_high": hi, "half_width": hw,
            "conclusive": hw is not None and hw <= 0.05, "blocks": 8, "calls_row": 80, "calls_base": 40}


def bench(speeds: dict, scopes=("model", "e2e"), too_slow: bool = False, rounds: int = 8) -> dict:
    """Benchmark metrics of a row measured against `base`: batch -> (speedup, ci_low, ci_high) for every
    scope in `scopes`; None: metrics from before the paired benchmark (no `paired`)."""
    batches = {}
    for b, (s, lo, hi) in speeds.items():
        entry = {"model": stats(10.0 / s), "e2e": stats(12.0 / s), "seq_len": 20}
        if not too_slow or rounds:
            entry |= {"paired": {sc: paired(s, lo, hi) for sc in scopes},
                      "baseline": {"model": stats(10.0), "e2e": stats(12.0), "pretokenized": None}}
        entry["paired_run"] = {"rounds": rounds, "stopped": "time box" if too_slow else "width", "elapsed_s": 3.2,
                               "too_slow": too_slow, "ci_width": 0.05, "confidence": 0.95, "min_rounds": 4,
                               "warmup_s": 0.1, "block_calls": {}}
        batches[b] = entry
    return {"params": 1000, "nonzero_params": 1000, "baseline": {"config": "base", "precision": "fp32"},
            "method": "paired-abba-bootstrap", "batches": batches}


BASE = {"params": 1000, "nonzero_params": 1000, "baseline": None, "batches": {
    b: {"model": stats(10.0), "e2e": stats(12.0), "seq_len": 20} for b in ("1", "32")}}


def rows(**benches) -> list[dict]:
    out = [measured_row("base", "ok", None, {"accuracy": 0.90}, BASE, ["1", "32"])]
    out += [measured_row(name, "ok", None, {"accuracy": 0.90}, m, ["1", "32"]) for name, m in benches.items()]
    judge_rows(out, "base", GATES)
    return out


def verdict(metrics: dict) -> dict:
    return rows(cand=metrics)[1]


def test_the_low_end_of_the_interval_clears_the_gate():
    r = verdict(bench({"1": (6.0, 5.8, 6.2), "32": (5.0, 4.9, 5.1)}))
    assert r["verdict"] == "ready" and r["speedup_method"] == "paired" and r["speedup_scope"] == "e2e"
    assert r["speedup"] == {"1": 6.0, "32": 5.0} and r["speedup_ci"]["1"] == {"low": 5.8, "high": 6.2}
    assert r["speedup_min"] == 5.0 and r["speedup_low_min"] == 4.9
    # what results.json carries per batch size and scope
    assert r["paired"]["1"]["model"] == {"speedup": 6.0, "speedup_ci_low": 5.8, "speedup_ci_high": 6.2,
                                         "half_width": 0.033333, "conclusive": True, "blocks": 8,
                                         "calls": {"row": 80, "base": 40}}
    assert r["paired_run"]["1"]["stopped"] == "width" and r["baseline_p50_ms"]["1"]["e2e"] == 12.0
    assert verdict(bench({"1": (1.55, 1.5, 1.6)}))["verdict"] == "ready"  # exactly at the gate passes


def test_slower_only_when_the_high_end_is_below_one():
    r = verdict(bench({"1": (2.0, 1.95, 2.05), "32": (0.52, 0.50, 0.54)}))
    assert r["verdict"] == "slower than baseline (0.52× (0.50–0.54) at batch 32)"
    # a wide interval entirely below 1 is still slower, not inconclusive
    assert verdict(bench({"1": (0.6, 0.3, 0.9)}))["verdict"] == "slower than baseline (0.60× (0.30–0.90) at batch 1)"
    # high end 1.0 or above: not "slower"; wholly below the gate: "speedup < G"
    assert verdict(bench({"1": (0.95, 0.85, 1.01)}))["verdict"] == "speedup 0.95× (0.85–1.01) < 1.5× at batch 1"
    assert verdict(bench({"1": (0.99, 0.98, 0.9999)}))["verdict"] == \
        "slower than baseline (0.9900× (0.9800–0.9999) at batch 1)"  # decimals show it below 1


def test_a_wide_interval_is_inconclusive_only_when_it_contains_the_gate():
    r = verdict(bench({"1": (1.6, 1.35, 1.9), "32": (3.0, 2.9, 3.1)}))
    assert r["verdict"] == "inconclusive (±18.8 % at batch 1)" and r["reasons"] == [r["verdict"]]
    # just over ci_width: enough decimals to differ from it
    assert verdict(bench({"1": (1.5, 1.45, 1.5751)}))["verdict"] == "inconclusive (±5.01 % at batch 1)"
    assert verdict(bench({"1": (1.52, 1.49, 1.55)}))["verdict"] == \
        "speedup 1.52× (1.49–1.55) < 1.5× at batch 1"  # within ±5%: decided below the gate
    # wider than ±5% but wholly above the gate: the gate holds, however wide (the width is in the report)
    assert verdict(bench({"1": (2.0, 1.8, 2.3), "32": (3.2, 1.6, 4.6)}))["verdict"] == "ready"
    # wider than ±5% and wholly between 1 and the gate: decided below it
    assert verdict(bench({"1": (1.25, 1.05, 1.45)}))["verdict"] == \
        "speedup 1.25× (1.05–1.45) < 1.5× at batch 1"


def test_a_narrow_interval_that_straddles_the_gate():
    r = verdict(bench({"1": (1.55, 1.49, 1.58), "32": (1.8, 1.75, 1.85)}))
    assert r["verdict"] == "speedup 1.55× (1.49–1.58) < 1.5× at batch 1"
    assert verdict(bench({"1": (1.55, 1.4999, 1.58)}))["verdict"] == \
        "speedup 1.5500× (1.4999–1.5800) < 1.5× at batch 1"


def test_too_slow_for_the_minimum_rounds_is_inconclusive():
    r = verdict(bench({"1": (3.0, None, None), "32": (3.0, 2.9, 3.1)}, too_slow=True, rounds=1))
    assert r["verdict"] == "inconclusive (too slow: 1 of 4 rounds within max_seconds at batch 1)"
    assert r["speedup"] == {"1": 3.0, "32": 3.0} and r["speedup_low_min"] is None


def test_model_scope_when_a_side_has_no_end_to_end():
    r = verdict(bench({"1": (4.0, 3.9, 4.1)}, scopes=("model",)))
    assert r["speedup_scope"] == "model" and r["verdict"] == "ready" and r["speedup"] == {"1": 4.0}


def test_metrics_without_paired_fall_back_to_the_cross_stage_ratio():
    old = {"params": 1000, "nonzero_params": 1000, "batches": {
        "1": {"model": stats(5.0), "e2e": stats(6.0), "seq_len": 20},
        "32": {"model": stats(5.0), "e2e": stats(10.0), "seq_len": 20}}}
    r = verdict(old)
    assert r["speedup_method"] == "cross-stage" and r["speedup_ci"] == {} and r["speedup_low_min"] is None
    assert r["speedup"] == {"1": 2.0, "32": 1.2} and r["verdict"] == "speedup 1.2x < 1.5x at batch 32"
    # paired against another configuration than the baseline: not this comparison either
    other = bench({"1": (6.0, 5.8, 6.2)})
    other["baseline"]["config"] = "someone-else"
    assert verdict(other)["speedup_method"] == "cross-stage"


def test_the_baseline_row_is_not_compared_with_itself():
    base = rows()[0]
    assert base["verdict"] == "baseline" and base["speedup_method"] is None and base["speedup"]["1"] == 1.0
    assert judge(base, None, GATES)["speedup_method"] is None


def test_stability_gates_are_off_by_default_and_optional():
    shaky = bench({"1": (6.0, 5.8, 6.2)})
    shaky["batches"]["1"]["e2e"]["spread"] = 0.3
    assert verdict(shaky)["verdict"] == "ready"
    r = measured_row("cand", "ok", None, {"accuracy": 0.90}, shaky, ["1"])
    base = measured_row("base", "ok", None, {"accuracy": 0.90}, BASE, ["1"])
    base |= judge(base, base, GATES)
    assert judge(r, base, GatesSpec(min_speedup=1.5, max_spread=0.1))["verdict"] == \
        "unstable timing (IQR 30% of median > 10% at batch 1, e2e)"


def test_best_ranks_on_the_low_end_of_the_interval():
    ranked = rows(wide=bench({"1": (3.10, 2.96, 3.15)}), tight=bench({"1": (3.0, 2.97, 3.05)}))
    assert [r["verdict"] for r in ranked[1:]] == ["ready", "ready"]
    assert pick_best(ranked) == "tight"  # 2.97 > 2.96, though 3.10 > 3.0
