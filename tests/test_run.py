"""The executor, in-process, on fake (pure-Python) stages: incremental rebuilds, failures, corruption."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from optforge.cache import Cache
from optforge.graph import Graph, Node, toposort
from optforge.lockfile import read_lock
from optforge.run import build, execute
from optforge.session import make_session, open_session

ALL = ["data", "teacher", "student", "teacher_logits", "distill", "prune:pruned", "prune:sparse",
       "evaluate:baseline", "benchmark:baseline", "evaluate:student", "benchmark:student",
       "evaluate:pruned", "benchmark:pruned", "evaluate:sparse", "benchmark:sparse",
       "quantize:pruned-dyn8", "evaluate:pruned-dyn8", "benchmark:pruned-dyn8",
       "compile:compiled", "evaluate:compiled", "benchmark:compiled"]
BELOW_DISTILL = ["distill", "prune:pruned", "evaluate:student", "benchmark:student", "evaluate:pruned",
                 "benchmark:pruned", "quantize:pruned-dyn8", "evaluate:pruned-dyn8", "benchmark:pruned-dyn8",
                 "compile:compiled", "evaluate:compiled", "benchmark:compiled"]


@pytest.fixture
def toy(tmp_path, monkeypatch, fake_kinds):
    monkeypatch.setenv("OPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return fake_kinds.write_toy(tmp_path / "recipes")


def run(path, **kw):
    lines, logs = [], []
    result = build(path, device="cpu", echo=lines.append, log=logs.append, progress=False,
                   render_report=False, **kw)
    result.lines, result.logs = lines, logs
    return result


def test_fakes_are_the_real_kinds_but_for_run():
    import dataclasses

    import fake_stages
    from optforge.stages.registry import get_kind, known_kinds

    assert sorted(fake_stages.KINDS) == known_kinds()
    for name, fake in fake_stages.KINDS.items():
        real = get_kind(name)
        assert fake.run is fake_stages.fake_run and dataclasses.replace(fake, run=real.run) == real, name
    assert fake_stages.KINDS["quantize"].hardware_bound is True  # the drift the hand-copied fakes had


def test_first_build_runs_everything_second_nothing(toy):
    first = run(toy)
    assert first.ran == ALL and first.exit_code == 0
    assert re.fullmatch(r"ran     data  \d+\.\ds", first.lines[0]), first.lines[0]
    assert first.lines[-1] == f"build: 21 ran, 0 cached in {first.seconds:.1f}s"
    lock = read_lock(toy.with_suffix(".lock"))
    assert lock["recipe"] == "toy" and list(lock["stages"]) == sorted(ALL)
    assert Cache().registered() == [str(toy.with_suffix(".lock"))]
    again = run(toy)
    assert again.ran == [] and again.cached == ALL
    assert again.lines[-1] == "nothing to do: 21 stages fresh"


EDITS = [
    ("data-param", ("max_train_samples: 8", "max_train_samples: 10"), ALL),
    ("teacher-param", ("lr: 1.0e-3}", "lr: 2.0e-3}"), ALL[1:]),
    ("student-param", ("layers: [0]", "layers: [1]"), ["student"] + BELOW_DISTILL),
    ("distill-param", ("temperature: 4.0", "temperature: 2.0"), BELOW_DISTILL),
    ("prune-structured", ("heads: 0.5", "heads: 0.25"),
     ["prune:pruned", "evaluate:pruned", "benchmark:pruned", "quantize:pruned-dyn8", "evaluate:pruned-dyn8",
      "benchmark:pruned-dyn8"]),
    ("prune-unstructured", ("amount: 0.5", "amount: 0.75"), ["prune:sparse", "evaluate:sparse", "benchmark:sparse"]),
    ("quantize-method", ("method: torch-int8-dynamic", "method: int8-dynamic"),
     ["quantize:pruned-dyn8", "evaluate:pruned-dyn8", "benchmark:pruned-dyn8"]),
    ("compile-mode", ("compile: default", "compile: max-autotune"),
     ["compile:compiled", "evaluate:compiled", "benchmark:compiled"]),
    ("config-precision", ("{name: student, model: student}", "{name: student, model: student, precision: bf16}"),
     ["evaluate:student", "benchmark:student"]),
    ("benchmark-param", ("min_runs: 5", "min_runs: 6"), [n for n in ALL if n.startswith("benchmark:")]),
    ("gates-only", ("max_accuracy_drop: 1.0", "max_accuracy_drop: 2.0"), []),
    ("config-added", ("  - {name: compiled, model: student, compile: default}\n",
                      "  - {name: compiled, model: student, compile: default}\n"
                      "  - {name: extra, model: sparse, precision: fp16}\n"),
     ["evaluate:extra", "benchmark:extra"]),
    # added first, it becomes the baseline: every row's speedup is measured against it in its benchmark
    ("baseline-changed", ("configs:\n", "configs:\n  - {name: extra, model: sparse, precision: fp16}\n"),
     ["evaluate:extra", "benchmark:extra"] + [n for n in ALL if n.startswith("benchmark:")]),
]


@pytest.mark.parametrize("edit", EDITS, ids=[e[0] for e in EDITS])
def test_each_edit_reruns_exactly_what_depends_on_it(toy, edit):
    _, (old, new), expected = edit
    run(toy)
    text = toy.read_text()
    assert text.count(old) == 1
    toy.write_text(text.replace(old, new))
    assert run(toy).ran == expected


def test_serve_benchmark_reads_every_row_and_follows_the_gates(toy):
    toy.write_text(toy.read_text() + "serve_benchmark: {config: best, rates: [10]}\n")
    assert run(toy).ran == ALL + ["serve_benchmark"]
    toy.write_text(toy.read_text().replace("max_accuracy_drop: 1.0", "max_accuracy_drop: 2.0"))
    plans = {p.name: p for p in open_session(toy, "cpu").plan()}
    assert plans["serve_benchmark"].reasons == ["serve_benchmark.gates.max_accuracy_drop 1.0 -> 2.0"]
    assert run(toy).ran == ["serve_benchmark"]


def test_plan_reasons_name_the_param_and_the_upstream(toy):
    run(toy)
    toy.write_text(toy.read_text().replace("temperature: 4.0", "temperature: 2.0"))
    plans = {p.name: p for p in open_session(toy, "cpu").plan()}
    assert plans["distill"].reasons == ["distill.temperature 4.0 -> 2.0"]
    assert plans["prune:pruned"].reasons == ["upstream distill changed"]
    assert plans["teacher"].status == "fresh" and plans["teacher"].reasons == []


def test_data_file_edit_reruns_everything(toy):
    run(toy)
    with open(toy.parent / "toydata" / "train.tsv", "a") as f:
        f.write("one more\t1\n")
    plans = {p.name: p for p in open_session(toy, "cpu").plan()}
    assert plans["data"].reasons == [f"data file train changed ({toy.parent / 'toydata' / 'train.tsv'})"]
    assert run(toy).ran == ALL


def test_removed_config_leaves_the_lock(toy):
    run(toy)
    toy.write_text(toy.read_text().replace("  - {name: sparse, model: sparse}\n", ""))
    assert run(toy).ran == []
    assert "evaluate:sparse" not in read_lock(toy.with_suffix(".lock"))["stages"]


def test_corrupted_artifact_is_detected_and_rebuilt(toy):
    run(toy)
    key = {p.name: p.key for p in open_session(toy, "cpu").plan()}["distill"]
    weights = Cache().entry_dir(key) / "weights.bin"
    good = weights.read_bytes()
    weights.write_bytes(b"0" * len(good))
    plans = {p.name: p for p in open_session(toy, "cpu").plan()}
    assert plans["distill"].reasons == ["output corrupted: weights.bin sha256 mismatch"]
    assert plans["prune:pruned"].status == "fresh"  # its own entry is intact and its key unchanged
    assert run(toy).ran == ["distill"]
    assert weights.read_bytes() == good


def test_upstream_corruption_with_forged_mtime_is_caught_before_use(toy):
    """The cheap plan check trusts size+mtime; a stage about to read an entry hashes it in full."""
    run(toy)
    key = {p.name: p.key for p in open_session(toy, "cpu").plan()}["distill"]
    art = Cache().entry_dir(key) / "artifact.txt"
    st = art.stat()
    art.write_text("X" * st.st_size)
    os.utime(art, ns=(st.st_atime_ns, st.st_mtime_ns))
    toy.write_text(toy.read_text().replace("heads: 0.5", "heads: 0.25"))  # prune:pruned reads distill
    result = run(toy)
    assert result.ran == ["distill", "prune:pruned", "evaluate:pruned", "benchmark:pruned", "quantize:pruned-dyn8",
                          "evaluate:pruned-dyn8", "benchmark:pruned-dyn8"]
    assert Cache().state(key, deep=True).status == "ok"


def test_stage_failure_is_recorded_not_retried_and_force_retries(toy, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "quantize:pruned-dyn8")
    first = run(toy)
    assert first.failed == ["quantize:pruned-dyn8"] and first.exit_code == 0
    assert first.skipped == ["evaluate:pruned-dyn8", "benchmark:pruned-dyn8"]
    assert "failed  quantize:pruned-dyn8: quantize:pruned-dyn8 is unsupported here (fake)" in first.lines
    assert "skipped evaluate:pruned-dyn8 (upstream quantize:pruned-dyn8 failed)" in first.lines
    assert first.outcomes["benchmark:pruned-dyn8"]["status"] == "skipped"
    assert first.lines[-1] == f"build: 18 ran, 0 cached, 1 failed, 2 skipped in {first.seconds:.1f}s"

    monkeypatch.delenv("FAKE_FAIL")
    again = run(toy)
    assert again.ran == [] and again.failed == ["quantize:pruned-dyn8"]  # a result, not retried
    assert again.lines[-1] == "nothing to do: 18 stages fresh, 1 failed, 2 skipped"
    forced = run(toy, force=["quantize:pruned-dyn8"])
    assert forced.ran == ["quantize:pruned-dyn8", "evaluate:pruned-dyn8", "benchmark:pruned-dyn8"]


def test_a_tolerant_stage_runs_on_the_inputs_that_succeeded(tmp_path, monkeypatch, fake_kinds):
    monkeypatch.setenv("OPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    recipe = fake_kinds.write_toy(tmp_path / "recipes", fake_kinds.TOY_RECIPE + "serve_benchmark: {config: best}\n")
    monkeypatch.setenv("FAKE_FAIL", "quantize:pruned-dyn8")
    result = run(recipe)
    below_failure = ["quantize:pruned-dyn8", "evaluate:pruned-dyn8", "benchmark:pruned-dyn8"]
    assert result.ran == [n for n in ALL if n not in below_failure] + ["serve_benchmark"]
    assert result.skipped == below_failure[1:]
    # every row's inputs but the failed / skipped ones of pruned-dyn8
    rows = ["baseline", "compiled", "pruned", "sparse", "student"]
    expected = ["data"] + [f"{what}:{row}" for row in rows for what in ("benchmark", "evaluate", "model")]
    assert result.outcomes["serve_benchmark"]["metrics"]["inputs"] == sorted(expected)


def test_crash_stops_the_build_caches_nothing_and_is_explained(toy, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CRASH", "student")
    result = run(toy)
    assert result.exit_code == 1 and result.crashed == ["student"]
    assert result.ran == ["data", "teacher"]
    assert "RuntimeError: fake bug in student" in capsys.readouterr().err  # the traceback
    assert result.lines[-1] == (f"build stopped: student crashed; 2 ran, 0 cached, 1 failed, 18 not run in "
                                f"{result.seconds:.1f}s (--keep-going builds what does not depend on it)")
    lock = read_lock(toy.with_suffix(".lock"))["stages"]
    assert set(lock) == {"data", "teacher", "student"} and lock["student"]["error"].startswith("RuntimeError")
    plans = {p.name: p for p in open_session(toy, "cpu").plan()}
    assert plans["student"].reasons == ["previous run failed: RuntimeError: fake bug in student"]
    assert not list((Cache().tmp).iterdir())  # its half-written output is gone
    monkeypatch.delenv("FAKE_CRASH")
    assert run(toy).ran == ALL[2:]


def test_keep_going_builds_what_does_not_depend_on_the_crash(toy, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH", "distill")
    result = run(toy, keep_going=True)
    assert result.exit_code == 1 and result.crashed == ["distill"]
    assert result.skipped == BELOW_DISTILL[1:]
    assert result.ran == [n for n in ALL if n not in BELOW_DISTILL]


def test_until_and_force(toy):
    assert run(toy, until="distill").ran == ["data", "teacher", "student", "teacher_logits", "distill"]
    assert run(toy, force=["teacher"]).ran == ["teacher"] + ALL[5:]  # the rest was simply not built yet
    assert run(toy, force=["teacher"]).ran == ["teacher"]  # same inputs, same key: downstream stays fresh


def test_dry_run_runs_nothing(toy):
    result = run(toy, dry_run=True)
    assert result.lines[0] == "would run data  (new stage)"
    assert result.lines[-1] == "dry run: 21 would run, 0 fresh"
    assert not toy.with_suffix(".lock").exists()


def hand_built_session(tmp_path):
    """A session over a graph made by hand (no recipe): DVC style."""
    data = tmp_path / "d.tsv"
    data.write_text("x\t1\n")
    graph = Graph(toposort([
        Node("data", "data", {"dataset": str(tmp_path)}, {}, {"train": str(data)}),
        Node("teacher", "teacher", {"config": {}, "tokenizer": "t"}, {"data": "data"}),
        Node("eval:a", "evaluate", {}, {"model": "teacher", "data": "data"}),
        Node("eval:b", "evaluate", {"precision": "fp32"}, {"model": "teacher", "data": "data"}),
    ]))
    return make_session("hand", graph, Cache(tmp_path / "c"), "cpu", tmp_path / "hand.lock")


def test_hand_built_graph_shares_equal_work(tmp_path, fake_kinds):
    """DVC style: drive the executor with a graph made by hand."""
    session = hand_built_session(tmp_path)
    cache = session.cache
    lines = []
    result = execute(session, echo=lines.append, progress=False, render_report=False)
    assert result.ran == ["data", "teacher", "eval:a"] and result.cached == ["eval:b"]
    manifest = json.loads((cache.entry_dir(result.outcomes["eval:a"]["key"]) / "manifest.json").read_text())
    assert manifest["metrics"]["inputs"] == ["data", "model"]  # input_metrics reached the stage
    assert sorted(manifest["files"]) == ["artifact.txt", "sub/artifact.json", "weights.bin"]


def test_hand_built_graph_with_the_report_on_builds_and_writes_no_report(tmp_path, monkeypatch, fake_kinds):
    """No recipe, so no report: `execute` used to crash after the stages ran (recipe_path was None)."""
    monkeypatch.chdir(tmp_path)
    lines = []
    result = execute(hand_built_session(tmp_path), echo=lines.append, progress=False)
    assert result.ran == ["data", "teacher", "eval:a"] and result.cached == ["eval:b"]
    assert result.reports == []
    assert lines[-1] == result.summary and result.summary.startswith("build: 3 ran, 1 cached in ")
    assert not (tmp_path / "reports").exists()


def test_report_gets_every_stage_result(toy, monkeypatch):
    import optforge.report

    calls = []

    def fake_render(**kw):
        calls.append(kw)
        out = kw["out_dir"] / "report.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("report")
        return [out]

    monkeypatch.setattr(optforge.report, "render_reports", fake_render)
    monkeypatch.setenv("FAKE_FAIL", "compile:compiled")
    result = build(toy, device="cpu", echo=lambda s: None, progress=False)
    assert result.reports == [Path("reports") / "toy" / "report.md"]  # relative to the build's cwd
    kw = calls[0]
    assert set(kw["results"]) == set(ALL)
    assert kw["results"]["compile:compiled"]["status"] == "failed"
    assert kw["results"]["benchmark:compiled"] == {"status": "skipped", "metrics": {}, "key": kw["results"]["benchmark:compiled"]["key"],
                                                   "reason": "upstream compile:compiled failed"}
    assert kw["results"]["data"]["status"] == "ok" and "digest" in kw["results"]["data"]["metrics"]
    env = kw["env"]
    assert env["device"]["kind"] == "cpu" and env["device"]["name"]
    assert set(env["versions"]) == {"torch", "transformers", "torchao", "optforge"}
    assert len(env["recipe_hash"]) == 64 and len(env["data_fingerprint"]) == 64
    build(toy, device="cpu", echo=lambda s: None, progress=False)
    assert len(calls) == 1  # nothing changed: not re-rendered
    (toy.parent.parent / "reports/toy/report.md").unlink()
    build(toy, device="cpu", echo=lambda s: None, progress=False)
    assert len(calls) == 2  # its output went missing: rendered again


def test_gc_never_removes_what_a_first_build_is_making(tmp_path, fake_kinds, monkeypatch):
    """gc used to read the registry, then remove what a first build registered and sealed meanwhile (and
    rewrite recipes.json without the registry lock, dropping that build's lock file)."""
    import threading

    from optforge.lockfile import write_lock

    session = hand_built_session(tmp_path)
    cache = session.cache
    other = tmp_path / "other.lock"  # some other recipe, so that gc has something to read
    write_lock(other, "other", {})
    cache.register(other)
    build_thread = threading.Thread(target=lambda: execute(session, echo=lambda s: None, progress=False,
                                                           render_report=False))
    real_registered = Cache.registered

    def registered_then_a_first_build_starts(self):
        snapshot = real_registered(self)
        if threading.current_thread() is threading.main_thread() and build_thread.ident is None:
            build_thread.start()
            build_thread.join(1)  # gc goes on while that build runs (or waits for gc)
        return snapshot

    monkeypatch.setattr(Cache, "registered", registered_then_a_first_build_starts)
    cache.gc()
    build_thread.join(30)
    monkeypatch.undo()
    assert str(session.lock_file) in cache.registered()
    keys = {s["key"] for s in read_lock(session.lock_file)["stages"].values()}
    assert len(keys) == 3 and all(cache.state(k).status == "ok" for k in keys)
