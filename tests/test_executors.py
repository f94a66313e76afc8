"""Executors (issue 13, part 2): `--executor dask` on a real local Dask cluster (worker processes started by
the build, or by the test for `--address`), with the fake stages (tests/fake_stages.py: real keys, real
artifacts, milliseconds each). A distributed build must leave the same lock file and report as a local
one; failures, keep-going and stop behave as locally; user mistakes are one line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from optforge.cache import Cache
from optforge.cli import INTERRUPTED
from optforge.errors import ExecutorError
from optforge.executors import executor_for
from optforge.lockfile import read_lock
from optforge.stage_job import machine_lock_path, machine_share, resources_for
from optforge.stages.registry import get_kind
from optforge_testing import TINY
from test_cli import entries, wait_for_line

distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")  # a dependency of distributed

from optforge.dask_executor import local_workers, missing_resources, visible_gpus  # noqa: E402


# --------------------------------------------------------------------------- pure parts


def test_what_stages_ask_for_and_what_local_workers_offer():
    assert resources_for(get_kind("benchmark"), "cpu") == {"cpu_bench": 1}
    assert resources_for(get_kind("serve_benchmark"), "cpu") == {"cpu_bench": 1}
    assert resources_for(get_kind("lm_benchmark"), "cpu") == {"cpu_bench": 1}
    assert resources_for(get_kind("teacher"), "cpu") == {}
    assert resources_for(get_kind("teacher"), "cuda") == {"GPU": 1}
    assert resources_for(get_kind("benchmark"), "cuda") == {"GPU": 1}
    assert resources_for(get_kind("data"), "cuda") == {}  # no torch: any worker
    cpu = local_workers("cpu", cores=2, gpus=[])
    assert [w["resources"] for w in cpu.values()] == [{"cpu_bench": 1}, {}]  # one benchmark per machine
    assert len(local_workers("cpu", cores=64, gpus=[])) == 4
    gpu = local_workers("cuda", cores=16, gpus=["0", "3"])
    assert gpu == {"gpu0": {"resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": "0"}},
                   "gpu3": {"resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": "3"}}}
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,2"}) == ["1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    needs = {"teacher": {}, "benchmark:baseline": {"cpu_bench": 1}}
    assert missing_resources(needs, [{}, {}]) == ("benchmark:baseline", {"cpu_bench": 1})
    assert missing_resources(needs, [{}, {"cpu_bench": 1}]) is None


def test_a_timing_stage_has_the_machine_to_itself(tmp_path):
    """machine_share: a benchmark waits for the stage running beside it, and nothing starts beside it."""
    lock, events = tmp_path / "machine.lock", []

    def stage(name, exclusive, hold):
        with machine_share(exclusive, lock):
            events.append(f"{name}+")
            time.sleep(hold)
            events.append(f"{name}-")

    train = threading.Thread(target=stage, args=("train", False, 0.3))
    train.start()
    time.sleep(0.05)
    bench = threading.Thread(target=stage, args=("bench", True, 0.2))
    bench.start()
    time.sleep(0.05)
    evaluate = threading.Thread(target=stage, args=("eval", False, 0.0))  # comes after the waiting benchmark
    evaluate.start()
    for t in (train, bench, evaluate):
        t.join()
    assert events == ["train+", "train-", "bench+", "bench-", "eval+", "eval-"]


def test_a_cuda_timing_stage_locks_its_gpu_not_the_machine():
    """CPU builds: one lock per machine; CUDA builds: one per GPU (the worker's first visible GPU)."""
    cpu = machine_lock_path("cpu", {"CUDA_VISIBLE_DEVICES": "1"})
    gpu0, gpu1 = machine_lock_path("cuda", {"CUDA_VISIBLE_DEVICES": "0"}), machine_lock_path("cuda", {"CUDA_VISIBLE_DEVICES": "1"})
    assert len({cpu, gpu0, gpu1}) == 3
    assert machine_lock_path("cuda", {}) == gpu0  # unset: torch's cuda:0 is GPU 0
    assert machine_lock_path("cuda", {"CUDA_VISIBLE_DEVICES": "1,0"}) == gpu1
    assert machine_lock_path("cuda", {"CUDA_VISIBLE_DEVICES": "GPU-ab/c"}).name.startswith("optforge-gpu-GPU-ab_c-")


def test_user_mistakes_are_one_line(monkeypatch):
    with pytest.raises(ExecutorError, match="--address names a Dask scheduler: it needs --executor dask"):
        executor_for("local", "tcp://127.0.0.1:8786", "cpu", print, print)
    monkeypatch.delitem(sys.modules, "optforge.dask_executor", raising=False)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(ExecutorError, match=r"--executor dask needs dask and distributed .*pip install 'optforge\[dask\]'"):
        executor_for("dask", None, "cpu", print, print)


# --------------------------------------------------------------------------- builds


def project(root: Path, recipe: Path = TINY) -> Path:
    (root / "recipes").mkdir(parents=True)
    return Path(shutil.copy(recipe, root / "recipes" / recipe.name))


def results(root: Path, name: str = "tiny") -> dict:
    """The report's results.json less where the project lives (the two builds' folders differ). Nothing else
    differs: the fake stages measure no time."""
    data = json.loads((root / "reports" / name / "results.json").read_text())
    assert data.pop("recipe_path") == str(root / "recipes" / f"{name}.yaml")
    return data


def test_dask_build_leaves_the_lock_file_and_report_of_a_local_build(cli, optforge_env):
    local, dask = project(optforge_env.root / "local"), project(optforge_env.root / "dask")
    a = cli("build", local, cwd=local.parents[1], env={"OPTFORGE_CACHE": str(optforge_env.root / "cache-local")})
    assert a.returncode == 0, a.stderr
    b = cli("build", dask, "--executor", "dask", cwd=dask.parents[1],
            env={"OPTFORGE_CACHE": str(optforge_env.root / "cache-dask")})
    assert b.returncode == 0, b.stderr
    assert local.with_suffix(".lock").read_bytes() == dask.with_suffix(".lock").read_bytes()
    assert results(local.parents[1]) == results(dask.parents[1])
    ran = lambda out: sorted(ln.split()[1] for ln in out.splitlines() if ln.startswith("ran "))  # noqa: E731
    assert ran(b.stdout) == ran(a.stdout) and len(ran(a.stdout)) == len(json.loads(
        local.with_suffix(".lock").read_text())["stages"])
    again = cli("build", dask, "--executor", "dask", cwd=dask.parents[1],
                env={"OPTFORGE_CACHE": str(optforge_env.root / "cache-dask")})
    assert again.stdout.splitlines()[-1].startswith("nothing to do: ")  # no cluster for a no-op build


def test_failures_skip_their_dependents_and_a_crash_stops_the_build(cli, optforge_env, fake_kinds):
    toy = fake_kinds.write_toy(optforge_env.root / "recipes")
    failed = cli("build", toy, "--executor", "dask", env={"FAKE_FAIL": "prune:pruned"})
    assert failed.returncode == 0, failed.stderr  # a StageFailure is a result
    assert "failed  prune:pruned: prune:pruned is unsupported here (fake)" in failed.stdout
    assert "skipped evaluate:pruned (upstream prune:pruned failed)" in failed.stdout
    lock = json.loads(toy.with_suffix(".lock").read_text())["stages"]
    assert "evaluate:pruned" not in lock and "evaluate:student" in lock

    crashed = cli("build", toy, "--executor", "dask", "--force", "distill", env={"FAKE_CRASH": "distill"})
    assert crashed.returncode == 1
    assert "RuntimeError: fake bug in distill" in crashed.stderr  # its traceback, from the worker
    assert crashed.stdout.splitlines()[-1].startswith("build stopped: distill crashed;")
    assert json.loads(toy.with_suffix(".lock").read_text())["stages"]["distill"]["error"] == \
        "RuntimeError: fake bug in distill"

    going = cli("build", toy, "--executor", "dask", "--keep-going", "--force", "distill",
                env={"FAKE_CRASH": "distill"})
    assert going.returncode == 1
    assert "skipped evaluate:student (upstream distill failed)" in going.stdout
    assert "crashed: distill" in going.stdout.splitlines()[-1]


def test_address_mistakes_are_one_line(cli, optforge_env, fake_kinds):
    toy = fake_kinds.write_toy(optforge_env.root / "recipes")
    no_remote = cli("build", toy, "--executor", "dask", "--address", "tcp://127.0.0.1:9")
    assert no_remote.returncode == 2
    assert no_remote.stderr.strip().splitlines() == [
        "error: workers on other machines (--address) get their inputs and return their outputs through a "
        "remote cache: name one (--remote URL, $OPTFORGE_REMOTE or the recipe's cache.remote)"]
    unreachable = cli("build", toy, "--executor", "dask", "--address", "tcp://127.0.0.1:9",
                      "--remote", f"file://{optforge_env.root / 'remote'}",
                      env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"})
    assert unreachable.returncode == 2
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:9 ("), lines


def test_workers_elsewhere_move_entries_through_the_remote_cache(cli, optforge_env, fake_kinds, tmp_path):
    """--address: the workers (started here with a cache of their own, as on another machine) pull inputs
    from and publish outputs to the remote; the build pulls them back and writes a local build's lock file."""
    toy = fake_kinds.write_toy(optforge_env.root / "recipes")
    reference = fake_kinds.write_toy(tmp_path / "reference" / "recipes")
    local = cli("build", reference, cwd=reference.parents[1], env={"OPTFORGE_CACHE": str(tmp_path / "ref-cache")})
    assert local.returncode == 0, local.stderr
    worker_cache = tmp_path / "worker-cache"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  resources={"cpu_bench": 1}, env={"OPTFORGE_CACHE": str(worker_cache)}) as cluster:
        # the build has teacher already (its own, never pushed): the workers need it through the remote
        first = cli("build", toy, "--until", "teacher")
        assert first.returncode == 0, first.stderr
        remote = f"file://{tmp_path / 'remote'}"
        built = cli("build", toy, "--executor", "dask", "--address", cluster.scheduler_address, "--remote", remote)
    assert built.returncode == 0, built.stderr
    assert toy.with_suffix(".lock").read_bytes() == reference.with_suffix(".lock").read_bytes()
    assert "cached  teacher" in built.stdout
    assert any((worker_cache / "objects").iterdir())  # the workers sealed into their own cache
    # every stage: data and teacher published by the build (the workers' inputs), the rest by the workers
    stages = json.loads(toy.with_suffix(".lock").read_text())["stages"]
    assert len(list((tmp_path / "remote" / "entries").glob("*/*.json"))) == len(stages) == 21


def test_workers_elsewhere_never_run_a_stage_that_reads_this_machines_files(cli, optforge_env, fake_kinds, tmp_path):
    """--address: the data stage reads files by this machine's paths, so the build runs it itself and the
    workers get its entry through the remote; here a worker that ran it would fail it (FAKE_FAIL in the
    workers' environment only)."""
    toy = fake_kinds.write_toy(optforge_env.root / "recipes")
    reference = fake_kinds.write_toy(tmp_path / "reference" / "recipes")
    assert cli("build", reference, cwd=reference.parents[1], env={"OPTFORGE_CACHE": str(tmp_path / "ref-cache")}).returncode == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  resources={"cpu_bench": 1},
                                  env={"OPTFORGE_CACHE": str(tmp_path / "worker-cache"), "FAKE_FAIL": "data"}) as cluster:
        built = cli("build", toy, "--executor", "dask", "--address", cluster.scheduler_address,
                    "--remote", f"file://{tmp_path / 'remote'}")
    assert built.returncode == 0, built.stderr
    assert "ran     data" in built.stdout and "failed" not in built.stdout
    assert toy.with_suffix(".lock").read_bytes() == reference.with_suffix(".lock").read_bytes()


def test_a_ctrl_c_after_the_last_wait_still_interrupts_the_build():
    """Ctrl-C sets a flag that wait() raises; one pressed after the last wait() is raised by close(), once."""
    from optforge.dask_executor import DaskExecutor

    late = DaskExecutor(None, "cpu", lambda _: None)
    late._on_sigint(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        late.close()
    late.close()  # raised once: a second close is quiet

    early = DaskExecutor(None, "cpu", lambda _: None)
    early._on_sigint(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        early.wait()
    early.close()  # already raised by wait(): close only cleans up

    quiet = DaskExecutor(None, "cpu", lambda _: None)
    quiet.close()


def _alive(proc: psutil.Process) -> bool:
    """Still running (a zombie no container init reaps is dead; a pid reused since is not that process)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("group", [False, True], ids=["build", "process-group"])
def test_ctrl_c_closes_the_local_cluster_with_its_stages(cli, optforge_env, fake_kinds, group):
    """SIGINT to a `--executor dask` build while a stage runs in a worker (distill, sleeping), sent to the
    build alone, or to its process group as a terminal's Ctrl-C is (the workers get it too): the build stops
    its local cluster (no worker process outlives it) and exits 130 saying it was interrupted, with no
    traceback; its lock file holds only the stages that finished, and a local build afterwards reuses them
    and runs the rest, the interrupted stage's half-written output never trusted."""
    toy = fake_kinds.write_toy(optforge_env.root / "recipes")
    started = optforge_env.root / "started.txt"
    build = cli("build", toy, "--executor", "dask", env={"FAKE_SLEEP": "distill:60", "FAKE_STARTED": str(started)},
                background=True, start_new_session=group)
    children: list[psutil.Process] = []
    try:
        wait_for_line(started, "distill", build)
        children = psutil.Process(build.pid).children(recursive=True)  # the workers, multiprocessing's tracker
        assert len(children) >= len(local_workers("cpu", os.cpu_count() or 1, [])), children
        if group:
            os.killpg(build.pid, signal.SIGINT)
        else:
            build.send_signal(signal.SIGINT)
        out, err = build.communicate(timeout=60)
    except BaseException:  # a hang, or it died early: leave nothing running
        for proc in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        build.kill()
        raise
    assert build.returncode == 130, (build.returncode, out, err)
    assert "Traceback" not in out + err, err
    assert err.strip().splitlines() == [INTERRUPTED]  # nothing from the workers' teardown either
    deadline = time.monotonic() + 30
    while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if _alive(c)], "worker processes outlived the interrupted build"

    ran = [ln.split()[1] for ln in out.splitlines() if ln.startswith("ran ")]
    lock = read_lock(toy.with_suffix(".lock"))["stages"]
    # what finished, and nothing else: a stage is recorded before its line is printed, so a Ctrl-C between
    # the two leaves one in the lock file that the output does not name (the resumed build below finds it whole)
    assert set(ran) <= set(lock) and "distill" not in lock
    assert {"data", "teacher", "student", "teacher_logits"} <= set(lock)  # distill's inputs, done before it
    assert not any("error" in record for record in lock.values())

    resumed = cli("build", toy)
    assert resumed.returncode == 0, resumed.stderr
    cached = {ln.split()[1] for ln in resumed.stdout.splitlines() if ln.startswith("cached ")}
    # and any a worker sealed whole after the interrupt, before its cluster closed (recorded by no build)
    assert set(lock) <= cached and "distill" not in cached
    assert "distill" in [ln.split()[1] for ln in resumed.stdout.splitlines() if ln.startswith("ran ")]
    assert not any(Cache().tmp.iterdir())  # the killed worker's half-written output: swept, never read
    clean = cli("build", toy, env={"OPTFORGE_CACHE": str(optforge_env.root / "clean-cache")})
    assert clean.returncode == 0, clean.stderr
    assert entries(optforge_env.cache) == entries(optforge_env.root / "clean-cache")
