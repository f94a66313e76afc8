"""End to end on the real stages and recipes/tiny.yaml (random-init 2-layer BERT, <= 512 SST-2 rows).

One full build (about a minute on 2 CPU cores) is made once per session; each test works on a copy of
its cache and lock file, so tests are independent and only pay for what they change. Expected stage
sets come from the graph (`downstream` of the edited stage), not from a hand-written list, so the test
says the rule itself: an edit reruns exactly what depends on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from optforge_testing import REPO, TINY, copy_built, run_cli as optforge, shared_data_root
from optforge.cache import Cache
from optforge.graph import build_graph
from optforge.lockfile import read_lock
from optforge.progress import fmt_duration
from optforge.recipe import Recipe

pytestmark = pytest.mark.skipif(not (shared_data_root() / "sst2" / "train.tsv").is_file(), reason="no SST-2 data")


@pytest.fixture
def tiny(built_tiny, tmp_path):
    """A private copy of the built recipe: (recipe path, run(*args), cache)."""
    return copy_built(built_tiny, tmp_path)


def names(stdout: str, verb: str) -> list[str]:
    return [line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith(verb + " ")]


def plan(t) -> dict[str, dict]:
    result = t.run("plan", t.recipe, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)["stages"]}


def edit(recipe: Path, change) -> Recipe:
    data = yaml.safe_load(recipe.read_text())
    change(data)
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return Recipe.model_validate(data)


def stale(p: dict) -> set[str]:
    return {n for n, s in p.items() if s["status"] == "stale"}


def test_full_build_then_noop_imports_no_torch(built_tiny, tiny):
    recipe = Recipe.model_validate(yaml.safe_load(tiny.recipe.read_text()))
    n = len(build_graph(recipe, tiny.recipe.parent).nodes)
    out = built_tiny.stdout
    assert out.splitlines()[-1].startswith("build: ")
    assert len(names(out, "ran") + names(out, "failed") + names(out, "skipped")) == n  # failed: recorded rows
    assert (built_tiny.root / "reports" / "tiny" / "report.md").is_file()
    mods = tiny.root / "modules.txt"
    env = dict(os.environ, OPTFORGE_CACHE=str(tiny.cache), OPTFORGE_DATA_ROOT=str(shared_data_root()),
               OPTFORGE_TEST_FAKE_STAGES="0", OPTFORGE_TEST_MODULES_OUT=str(mods))
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "tests" / "cli_wrapper.py"), "build", tiny.recipe,
                             "--device", "cpu"], cwd=tiny.root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"nothing to do: {n} stages fresh"
    assert "torch" not in mods.read_text().split()
    print(f"no-op build: {wall:.2f}s")  # the budget (<= 1 s) is measured by benchmarks/noop_build.py


def test_a_piped_build_reports_training_progress_in_lines(built_tiny, tiny):
    """Off a terminal, the teacher's and the distill stage's training print progress lines to stderr:
    steps climbing to the total (the steps the stage recorded), rates, the loss, elapsed, ETA, then the totals."""
    lock = read_lock(tiny.recipe.with_suffix(".lock"))["stages"]
    err = built_tiny.stderr.splitlines()
    for stage, desc in [("teacher", "teacher finetune"), ("distill", "distill")]:
        total = Cache(tiny.cache).manifest(lock[stage]["key"])["metrics"]["steps"]
        prefix = f"  [{stage}] {desc}: "
        step_line = re.compile(rf"step (\d+)/{total} \(\d+%\), [\d.]+ steps/s, [\d.]+ ex/s, loss \d+\.\d{{4}}, "
                               r"elapsed \S+, ETA \S+")
        steps = [int(m[1]) for line in err if line.startswith(prefix)
                 for m in [step_line.fullmatch(line[len(prefix):])] if m]
        assert steps and steps == sorted(set(steps)) and steps[-1] <= total, err
        done = [line for line in err if line.startswith(f"{prefix}done: ")]
        assert len(done) == 1 and re.fullmatch(rf"{re.escape(prefix)}done: {total} steps in \S+, [\d.]+ steps/s, "
                                               r"[\d.]+ ex/s, loss \d+\.\d{4}", done[0]), done


def test_plan_expects_what_each_stage_took_here(tiny):
    """After the build, a stale stage's plan line says how long its last run took on this machine."""
    timings = json.loads((tiny.cache / "timings.json").read_text())["machines"]
    (machine,) = timings
    took = timings[machine]["recipes"]["tiny"]
    edit(tiny.recipe, EXPENSIVE_EDITS["distill"][0])
    result = tiny.run("plan", tiny.recipe, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    distill = next(line for line in result.stdout.splitlines() if line.split()[:2] == ["stale", "distill"])
    assert distill.split()[2] == f"~{fmt_duration(took['distill']['s'])}", result.stdout
    as_json = json.loads(tiny.run("plan", tiny.recipe, "--device", "cpu", "--json").stdout)
    expected = as_json["expected"]
    assert expected["seconds"] == pytest.approx(sum(s["expected_s"] or 0 for s in as_json["stages"]))
    assert expected["seconds"] >= took["distill"]["s"]
    assert result.stdout.splitlines()[-1].startswith(
        f"~{fmt_duration(expected['seconds'])} expected for {expected['stale']} stale stages"), result.stdout


def test_lock_file_is_sorted_and_timeless(tiny):
    text = tiny.recipe.with_suffix(".lock").read_text()
    lock = json.loads(text)
    assert json.dumps(lock, sort_keys=True, indent=2) + "\n" == text
    teacher = lock["stages"]["teacher"]
    assert {"kind", "key", "params", "inputs", "versions"} <= set(teacher) and "device" not in teacher
    assert "device" in lock["stages"]["benchmark:baseline"]
    # no timestamps: no time/date word (a whole word: "onnxruntime" is a library the lock records) and no date
    assert not {"time", "date", "timestamp", "mtime"} & set(re.findall(r"[a-z]+", text))
    assert not re.search(r"\d{4}-\d{2}-\d{2}", text)


CHEAP_EDITS = {
    # name: (change to the YAML data, stage whose params change)
    "prune": (lambda d: d["prune"][0].update({"heads": 0.25} if d["prune"][0]["method"] == "structured"
                                             else {"amount": 0.25}), lambda r: f"prune:{r.prune[0].name}"),
    "quantize": (lambda d: d["quantize"].__setitem__(0, d["quantize"][0] | {
        "method": "int8-weight-only" if d["quantize"][0]["method"] == "torch-int8-dynamic" else "torch-int8-dynamic"}),
        lambda r: [f"quantize:{c.name}" for c in r.configs if c.quantize == r.quantize[0].name
                   and c.runtime == "torch"]),  # an onnxruntime row quantizes in its onnxruntime stage
    "benchmark": (lambda d: d["benchmark"].update(min_runs=d["benchmark"].get("min_runs", 20) + 1),
                  lambda r: [f"benchmark:{c.name}" for c in r.configs]),
}


@pytest.mark.parametrize("what", ["prune", "quantize"])
def test_cheap_edit_reruns_exactly_its_downstream(tiny, what):
    change, stage = CHEAP_EDITS[what]
    recipe = edit(tiny.recipe, change)
    graph = build_graph(recipe, tiny.recipe.parent)
    edited = stage(recipe)
    expected = set().union(*(graph.downstream(s) for s in ([edited] if isinstance(edited, str) else edited)))
    assert stale(plan(tiny)) == expected
    result = tiny.run("build", tiny.recipe, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    touched = names(result.stdout, "ran") + names(result.stdout, "failed") + names(result.stdout, "skipped")
    assert set(touched) == expected  # a method unsupported here is a recorded failure, not a crash
    assert set(names(result.stdout, "cached")) == set(graph.names()) - expected


EXPENSIVE_EDITS = {
    # name: (change, edited stage, reason, --until target that keeps the build short)
    "data": (lambda d: d["data"].update(max_train_samples=d["data"]["max_train_samples"] - 64), "data",
             "data.max_train_samples {old} -> {new}", "data"),
    "teacher": (lambda d: d["teacher"]["finetune"].update(seed=d["teacher"]["finetune"].get("seed", 0) + 1),
                "teacher", "teacher.finetune.seed {old} -> {new}", "teacher"),
    "distill": (lambda d: d["distill"].update(temperature=2.0), "distill",
                "distill.temperature {old} -> 2.0", "distill"),
    "benchmark": (CHEAP_EDITS["benchmark"][0], None, None, "benchmark:baseline"),
}


@pytest.mark.parametrize("what", list(EXPENSIVE_EDITS))
def test_expensive_edit_plans_its_downstream_and_builds_it(tiny, what):
    change, stage, reason, until = EXPENSIVE_EDITS[what]
    before = Recipe.model_validate(yaml.safe_load(tiny.recipe.read_text()))
    recipe = edit(tiny.recipe, change)
    graph = build_graph(recipe, tiny.recipe.parent)
    edited = [stage] if stage else CHEAP_EDITS[what][1](recipe)
    expected = set().union(*(graph.downstream(s) for s in edited))
    p = plan(tiny)
    assert stale(p) == expected
    if reason:
        old = {"data": before.data.max_train_samples, "distill": before.distill.temperature,
               "teacher": before.teacher.finetune.seed}.get(what)
        new = {"data": recipe.data.max_train_samples, "teacher": recipe.teacher.finetune.seed}.get(what)
        assert p[stage]["reasons"] == [reason.format(old=old, new=new)]
        for s in expected - {stage}:
            assert all(r.startswith("upstream ") for r in p[s]["reasons"]), p[s]
    result = tiny.run("build", tiny.recipe, "--device", "cpu", "--until", until)
    assert result.returncode == 0, result.stderr
    want = [n for n in graph.names() if n in expected and n in graph.upstream(until)]
    assert names(result.stdout, "ran") == want


def test_corrupted_safetensors_is_rebuilt_never_loaded(tiny):
    key = plan(tiny)["teacher"]["key"]
    weights = Cache(tiny.cache).entry_dir(key) / "model.safetensors"
    good = weights.read_bytes()
    with open(weights, "r+b") as f:
        f.seek(len(good) // 2)
        f.write(bytes(b ^ 0xFF for b in good[len(good) // 2: len(good) // 2 + 64]))
    p = plan(tiny)
    assert p["teacher"]["reasons"] == ["output corrupted: model.safetensors sha256 mismatch"]
    assert stale(p) == {"teacher"}  # nothing below it changed key
    result = tiny.run("build", tiny.recipe, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert names(result.stdout, "ran") == ["teacher"]
    assert weights.read_bytes() == good  # deterministic rebuild on the same machine
    verified = tiny.run("plan", tiny.recipe, "--json", "--device", "cpu", "--verify")
    assert stale({s["name"]: s for s in json.loads(verified.stdout)["stages"]}) == set()


def test_sigkill_during_teacher_then_resume_equals_clean_build(built_tiny, tmp_path):
    (tmp_path / "recipes").mkdir()
    recipe = shutil.copy(TINY, tmp_path / "recipes" / "tiny.yaml")
    cache = tmp_path / "cache"
    proc = optforge("build", recipe, "--device", "cpu", cwd=tmp_path, cache=cache, background=True)
    for line in proc.stdout:
        if line.startswith("ran     data"):
            break
    deadline = time.monotonic() + 60
    while not any(d.name.startswith(f"{proc.pid}-") for d in (cache / "tmp").iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)  # the teacher's output dir appears as it starts
    time.sleep(0.5)  # now it is loading the tokenizer / training
    assert proc.poll() is None, "the build ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert set(read_lock(Path(recipe).with_suffix(".lock"))["stages"]) == {"data"}, proc.stdout.read()
    assert any((cache / "tmp").iterdir())  # the teacher's partial output: never trusted
    resumed = optforge("build", recipe, "--device", "cpu", "--until", "teacher", cwd=tmp_path, cache=cache)
    assert resumed.returncode == 0, resumed.stderr
    assert names(resumed.stdout, "cached") == ["data"] and names(resumed.stdout, "ran") == ["teacher"], \
        resumed.stdout + resumed.stderr

    key = read_lock(Path(recipe).with_suffix(".lock"))["stages"]["teacher"]["key"]
    assert key == read_lock(built_tiny.recipe.with_suffix(".lock"))["stages"]["teacher"]["key"]
    ours = json.loads((Cache(cache).entry_dir(key) / "manifest.json").read_text())["files"]
    clean = json.loads((Cache(built_tiny.cache).entry_dir(key) / "manifest.json").read_text())["files"]
    assert {f: v["sha256"] for f, v in ours.items()} == {f: v["sha256"] for f, v in clean.items()}


def test_concurrent_build_is_refused_and_cache_stays_valid(tiny):
    first = tiny.run("build", tiny.recipe, "--device", "cpu", "--force", "teacher", "--until", "teacher",
                     background=True)
    lock = tiny.cache / "locks" / "tiny.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = tiny.run("build", tiny.recipe, "--device", "cpu")
    assert second.returncode == 2
    assert f"another build of 'tiny' is running (pid {first.pid})" in second.stderr
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert names(out, "ran") == ["teacher"]
    verified = tiny.run("plan", tiny.recipe, "--json", "--device", "cpu", "--verify")
    assert stale({s["name"]: s for s in json.loads(verified.stdout)["stages"]}) == set()
