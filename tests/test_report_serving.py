"""optforge/report/serving.py and the _serving partials: serve_benchmark metrics -> rows, chart, text."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from optforge.report.render import _environments
from optforge.report.serving import latency_load_svg, serving_from_results, serving_view


def run(mode, rate, achieved, p50, p99, meets, max_batch, ok=40, sent=40):
    return {"mode": mode, "max_batch": max_batch, "offered_rps": rate, "achieved_rps": achieved, "p50_ms": p50,
            "p99_ms": p99, "p99_all_ms": p99 if ok == sent else None, "meets_slo": meets, "sent": sent, "ok": ok,
            "rejected": sent - ok, "errors": 0, "timeouts": 0, "mean_batch_size": 1.0 if max_batch == 1 else 3.5,
            "breakdown_ms": {"queue": 0.5, "tokenize": 0.3, "forward": 2.0, "postprocess": 0.1, "serialize": 0.05,
                             "total": 3.0, "outside_server": 0.7}}


SERVING = {
    "config": "student<&>", "choice": {"requested": "best", "config": "student<&>", "why": "best | ready <b>"},
    "slo_p99_ms": 50.0, "duration_s": 4.0, "max_requests": 2000, "max_wait_ms": 5.0, "precision": "fp32",
    "server": {"model": "float fp32", "torch_threads": 2},
    "runs": [run("batching_on", 10.0, 9.9, 6.0, 12.0, True, 32), run("batching_off", 10.0, 9.8, 3.0, 8.0, True, 1),
             run("batching_off", 100.0, 61.0, 300.0, 900.0, False, 1, ok=380, sent=400),
             run("batching_on", 100.0, 99.0, 8.0, 30.0, True, 32)],
    "max_rps_under_slo": {"batching_off": 9.8, "batching_on": 99.0},
    "notes": ["batching_off: saturated at 100 rps offered"],
}


def test_serving_from_results():
    assert serving_from_results({}) is None
    ok = serving_from_results({"serve_benchmark": {"status": "ok", "metrics": {"serving": SERVING}}})
    assert ok["status"] == "ok" and ok["config"] == "student<&>"
    failed = serving_from_results({"serve_benchmark": {"status": "failed", "metrics": {}, "reason": "boom\nline"}})
    assert failed == {"status": "failed", "reason": "boom line"}
    missing = serving_from_results({"serve_benchmark": {"status": "missing", "metrics": {}, "reason": None}})
    assert missing == {"status": "missing", "reason": "not built"}


def test_view_orders_rows_and_summarises_both_modes():
    v = serving_view({**SERVING, "status": "ok"})
    assert [(r["mode"], r["offered"]) for r in v["rows"]] == [
        ("batching off", "10.0"), ("batching off", "100"), ("batching on", "10.0"), ("batching on", "100")]
    assert v["rows"][1]["answered"] == "380/400 (20 failed)" and v["rows"][1]["meets"] == "no"
    assert v["summary"] == [{"mode": "batching off", "max_batch": 1, "max_rps": "9.8"},
                            {"mode": "batching on", "max_batch": 32, "max_rps": "99.0"}]
    assert serving_view(None) is None
    none_ok = serving_view({**SERVING, "max_rps_under_slo": {"batching_off": 0.0, "batching_on": 0.0}})
    assert none_ok["summary"][0]["max_rps"].startswith("none")


def test_chart_is_well_formed_svg_with_escaped_text():
    svg = str(latency_load_svg(SERVING))
    root = ET.fromstring(svg)  # parses: every attribute and text is escaped
    assert root.tag.endswith("svg")
    assert "student&lt;&amp;&gt;" in svg and "student<&>" not in svg
    assert svg.count("<circle") == 4 and "SLO p99 50 ms" in svg
    assert latency_load_svg({**SERVING, "runs": []}) is None


@pytest.mark.parametrize("status", ["ok", "failed"])
def test_partials_render_escaped(status):
    md_env, html_env = _environments()
    serving = {**SERVING, "status": "ok"} if status == "ok" else {"status": "failed", "reason": "a | <script>"}
    v = serving_view(serving)
    md = md_env.from_string('{% include "_serving.md.j2" %}').render(serving=v)
    html = html_env.from_string('{% include "_serving.html.j2" %}').render(serving=v)
    assert md.startswith("## Serving") and "<script>" not in md and "<script>" not in html
    if status == "ok":
        assert "| batching on | 32 | 99.0 |" in md and "| batching off | 1 | 9.8 |" in md
        assert "p99 ≤ 50 ms" in md and "<b>" not in md and "&lt;b>" in md
        assert "<svg" in html and "student&lt;&amp;&gt;" in html
        table_lines = [line for line in md.splitlines() if line.startswith("| batching")]
        assert len({line.count("|") for line in table_lines[2:]}) == 1  # every curve row has every column
    else:
        assert "Serving benchmark failed: a \\| &lt;script>" in md
    json.dumps(serving, allow_nan=False)
