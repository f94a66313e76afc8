"""How long stages took on this machine (optforge/timings.py), and `plan`'s expected durations from it."""

from __future__ import annotations

import json
import multiprocessing
import re

import pytest

from optforge.cache import Cache
from optforge.device import device_fingerprint
from optforge.plan import StagePlan
from optforge.progress import fmt_duration
from optforge.timings import (MAX_MACHINES, MAX_RUNS, TIMINGS, Estimate, estimate, load, machine_name,
                              plan_estimates, record, total_line)

HERE, THERE = "cpu: Xeon, 2 cores", "cuda: NVIDIA H100, driver 550.54"


def test_the_same_stage_first_else_the_last_run_of_its_kind_on_this_machine(tmp_path):
    cache = Cache(tmp_path)
    record(cache, HERE, "sst2", "distill", "distill", 62.0, now=1)
    record(cache, HERE, "tiny", "distill", "distill", 3.5, now=2)
    record(cache, HERE, "sst2", "teacher", "teacher", 500.0, now=3)
    record(cache, HERE, "sst2", "teacher", "teacher", 526.25, now=4)  # the last run counts, not an average
    record(cache, THERE, "sst2", "benchmark:a", "benchmark", 40.0, now=5)
    runs = load(tmp_path)
    assert estimate(runs, HERE, "sst2", "teacher", "teacher") == Estimate(526.25, "stage", "teacher")
    assert estimate(runs, HERE, "sst2", "distill", "distill") == Estimate(62.0, "stage", "distill")
    assert estimate(runs, HERE, "sst2", "prune:p", "prune") is None  # another kind's time is no guide
    assert estimate(runs, HERE, "other", "distill", "distill") == Estimate(3.5, "kind", "distill")  # newest
    assert estimate(runs, HERE, "sst2", "benchmark:a", "benchmark") is None  # another machine's
    assert estimate(runs, THERE, "sst2", "benchmark:b", "benchmark") == Estimate(40.0, "kind", "benchmark")
    assert Estimate(526.25, "stage", "teacher").label() == "~8m46s"
    assert Estimate(3.5, "kind", "distill").label() == "~3.5s (last distill run)"


def test_the_file_holds_no_path_and_keeps_the_machines_heard_from_last(tmp_path):
    cache = Cache(tmp_path)
    record(cache, HERE, "r", "data", "data", 1.0, now=0)
    for m in range(MAX_MACHINES):
        record(cache, f"cpu: machine {m}", "r", "data", "data", 1.0, now=1 + m)
    data = json.loads((tmp_path / TIMINGS).read_text())
    assert str(tmp_path) not in json.dumps(data)
    assert sorted(data["machines"]) == sorted(f"cpu: machine {m}" for m in range(MAX_MACHINES))


def test_runs_per_machine_are_bounded_newest_kept(tmp_path):
    cache = Cache(tmp_path)
    for i in range(MAX_RUNS + 10):
        record(cache, HERE, "r", f"evaluate:c{i}", "evaluate", float(i), now=i)
    kept = load(tmp_path)[HERE]["r"]
    assert len(kept) == MAX_RUNS
    assert set(kept) == {f"evaluate:c{i}" for i in range(10, MAX_RUNS + 10)}


@pytest.mark.parametrize("content", [b"\x00not json{", b"[1, 2]", b'{"format": 99, "machines": {}}',
                                     b'{"format": 1, "machines": {"cpu: Xeon, 2 cores": {"recipes": {"sst2": '
                                     b'{"teacher": {"kind": "teacher", "s": "fast", "at": 1}, '
                                     b'"distill": {"kind": "distill", "s": -1, "at": 1}, '
                                     b'"data": {"kind": "data", "s": 1e999, "at": 1}}}}}}'])
def test_a_corrupt_file_is_no_estimate_and_a_build_writes_it_afresh(tmp_path, content):
    (tmp_path / TIMINGS).write_bytes(content)
    cache = Cache(tmp_path)
    assert estimate(load(tmp_path), HERE, "sst2", "teacher", "teacher") is None
    assert estimate(load(tmp_path), HERE, "sst2", "distill", "distill") is None
    record(cache, HERE, "sst2", "teacher", "teacher", 9.0, now=1)
    assert estimate(load(tmp_path), HERE, "sst2", "teacher", "teacher") == Estimate(9.0, "stage", "teacher")


def test_a_timing_that_cannot_be_written_is_dropped_silently(tmp_path):
    (tmp_path / TIMINGS).mkdir()  # a directory where the file goes: every write fails
    record(Cache(tmp_path), HERE, "sst2", "teacher", "teacher", 9.0)
    assert load(tmp_path) == {}


def _record_many(root, worker: int, n: int) -> None:
    cache = Cache(root)
    for i in range(n):
        record(cache, HERE, "r", f"stage-{worker}-{i}", "evaluate", float(i))


def test_concurrent_builds_lose_no_timing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(tmp_path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert set(load(tmp_path)[HERE]["r"]) == {f"stage-{w}-{i}" for w in range(4) for i in range(25)}


def _plan(name, kind, status="stale", blocked=None) -> StagePlan:
    return StagePlan(name, kind, "k" * 64, status, [], {}, blocked=blocked)


def test_the_total_line():
    plans = [_plan("data", "data", "fresh"), _plan("teacher", "teacher"), _plan("distill", "distill"),
             _plan("student", "student"), _plan("evaluate:q", "evaluate", blocked="upstream quantize:q failed")]
    known = {"teacher": Estimate(526.25, "stage", "teacher"), "distill": Estimate(343.75, "kind", "distill")}
    assert total_line(plans, known) == "~14m30s expected for 3 stale stages (1 never run here: no estimate)"
    assert total_line(plans[:3], known) == "~14m30s expected for 2 stale stages"
    assert total_line(plans, {}) == "no time estimate: none of the 3 stale stages has run on this machine"
    assert total_line(plans[:1], {}) is None  # nothing to do
    assert total_line(plans[:2], {"teacher": known["teacher"]}) == "~8m46s expected for 1 stale stage"


def test_plan_estimates_only_for_stale_stages_that_will_run(tmp_path):
    cache = Cache(tmp_path)
    for stage, kind in [("data", "data"), ("teacher", "teacher"), ("evaluate:x", "evaluate")]:
        record(cache, HERE, "sst2", stage, kind, 2.0)
    plans = [_plan("data", "data", "fresh"), _plan("teacher", "teacher"),
             _plan("evaluate:q", "evaluate", blocked="upstream quantize:q failed")]
    assert plan_estimates(tmp_path, HERE, "sst2", plans) == {"teacher": Estimate(2.0, "stage", "teacher")}


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def toy(optforge_env, fake_kinds):
    return fake_kinds.write_toy(optforge_env.root / "recipes")


def this_machine(cache) -> str:
    return machine_name(device_fingerprint("cpu", cache))


def test_plan_shows_what_the_last_runs_here_took_and_a_total(cli, toy, optforge_env):
    cache = Cache(optforge_env.cache)
    record(cache, this_machine(optforge_env.cache), "toy", "teacher", "teacher", 526.25)
    record(cache, this_machine(optforge_env.cache), "another-recipe", "distill", "distill", 62.0)
    record(cache, "cpu: another machine, 64 cores", "toy", "student", "student", 1.0)
    result = cli("plan", toy, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^stale  teacher\s+~8m46s\s+new stage$", out, re.M), out
    assert re.search(r"^stale  distill\s+~1m02s \(last distill run\)  new stage$", out, re.M), out
    assert re.search(r"^stale  student\s+new stage$", out, re.M), out  # another machine's time: none
    assert out.splitlines()[-2:] == ["21 stale, 0 fresh",
                                     "~9m48s expected for 21 stale stages (19 never run here: no estimate)"]
    data = json.loads(cli("plan", toy, "--device", "cpu", "--json").stdout)
    stages = {s["name"]: s for s in data["stages"]}
    assert (stages["teacher"]["expected_s"], stages["teacher"]["expected_from"]) == (526.25, "stage")
    assert (stages["distill"]["expected_s"], stages["distill"]["expected_from"]) == (62.0, "kind")
    assert (stages["student"]["expected_s"], stages["student"]["expected_from"]) == (None, None)
    assert data["expected"] == {"seconds": 588.25, "stale": 21, "no_estimate": 19}


def test_after_a_build_plan_expects_what_the_stages_took(cli, toy, optforge_env):
    assert cli("build", toy, "--device", "cpu").returncode == 0
    runs = load(optforge_env.cache)
    took = runs[this_machine(optforge_env.cache)]["toy"]
    assert len(took) == 21 and all(run.kind == stage.split(":")[0] for stage, run in took.items())
    toy.write_text(toy.read_text().replace("temperature: 4.0", "temperature: 2.0"))
    result = cli("plan", toy, "--device", "cpu")
    stale = [line for line in result.stdout.splitlines() if line.startswith("stale ")]
    assert len(stale) == 12
    for line in stale:
        name = line.split()[1]
        assert line.split()[2] == f"~{fmt_duration(took[name].seconds)}", line
    expected = sum(took[line.split()[1]].seconds for line in stale)
    assert result.stdout.splitlines()[-1] == f"~{fmt_duration(expected)} expected for 12 stale stages"


def test_a_corrupt_timings_file_plans_without_estimates(cli, toy, optforge_env):
    optforge_env.cache.mkdir()
    (optforge_env.cache / TIMINGS).write_bytes(b'{"format": 1, "machines": {"cpu')
    result = cli("plan", toy, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "~" not in result.stdout and result.stderr == ""
    assert result.stdout.splitlines()[-1] == "no time estimate: none of the 21 stale stages has run on this machine"
    assert cli("build", toy, "--device", "cpu").returncode == 0  # and a build writes it afresh
    assert len(load(optforge_env.cache)[this_machine(optforge_env.cache)]["toy"]) == 21
