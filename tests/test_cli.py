"""The CLI as users run it: subprocesses (SIGKILL, concurrent builds, imports) and in-process commands."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from optforge_testing import REPO
from optforge import __version__
from optforge.cache import Cache
from optforge.cli import main
from optforge.lockfile import read_lock


@pytest.fixture
def toy(optforge_env, fake_kinds):
    return fake_kinds.write_toy(optforge_env.root / "recipes")


def wait_for_line(path: Path, line: str, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{line!r} never appeared in {path}")


def entries(cache: Path) -> dict[str, dict]:
    """key -> {file: bytes} of every trusted entry."""
    c = Cache(cache)
    out = {}
    for key in c.keys():
        if c.state(key, deep=True).status == "ok":
            base = c.entry_dir(key)
            out[key] = {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
                        if p.is_file() and p.name != "manifest.json"}
    return out


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_build_then_noop_never_imports_torch(cli, toy, optforge_env):
    mods = optforge_env.root / "modules.txt"
    first = cli("build", toy, modules_out=mods)
    assert first.returncode == 0, first.stderr
    assert "torch" not in mods.read_text().split()  # the engine itself never needs it
    second = cli("build", toy, modules_out=mods)
    assert second.returncode == 0 and second.stdout.splitlines()[-1] == "nothing to do: 21 stages fresh"
    assert "torch" not in mods.read_text().split()
    assert "\r" not in first.stderr and "it/s" not in first.stderr  # no progress bars without a TTY


def test_plan_validate_dag_with_the_real_stage_registry_do_not_import_torch(cli, optforge_env):
    """Real stage modules must import torch inside run() only (ARCHITECTURE.md)."""
    recipe = REPO / "recipes" / "tiny.yaml"
    mods = optforge_env.root / "modules.txt"
    for args in (("validate", recipe), ("plan", recipe, "--json"), ("dag", recipe, "--format", "dot")):
        result = cli(*args, fake=False, modules_out=mods)
        assert result.returncode == 0, result.stderr
        assert "torch" not in mods.read_text().split(), args


def test_plan_json_is_one_object_naming_what_changed(cli, toy):
    assert cli("build", toy).returncode == 0
    toy.write_text(toy.read_text().replace("temperature: 4.0", "temperature: 2.0"))
    result = cli("plan", toy, "--json")
    assert result.returncode == 0, result.stderr
    stages = {s["name"]: s for s in json.loads(result.stdout)["stages"]}
    assert stages["distill"] == {"name": "distill", "kind": "distill", "status": "stale",
                                 "reasons": ["distill.temperature 4.0 -> 2.0"], "key": stages["distill"]["key"],
                                 "expected_s": stages["distill"]["expected_s"], "expected_from": "stage"}
    assert stages["prune:pruned"]["reasons"] == ["upstream distill changed"]
    assert stages["teacher"]["status"] == "fresh"
    human = cli("plan", toy)
    assert re.search(r"^stale  distill\s+~\S+\s+distill\.temperature 4\.0 -> 2\.0$", human.stdout, re.M)
    assert human.stdout.splitlines()[-2] == "12 stale, 9 fresh"
    assert human.stdout.splitlines()[-1].endswith(" expected for 12 stale stages")  # tests/test_timings.py


def test_sigkill_mid_stage_then_rebuild_equals_a_clean_build(cli, toy, optforge_env):
    started = optforge_env.root / "started.txt"
    proc = cli("build", toy, env={"FAKE_SLEEP": "distill:60", "FAKE_STARTED": str(started)}, background=True)
    wait_for_line(started, "distill", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    lock = read_lock(toy.with_suffix(".lock"))["stages"]
    assert set(lock) == {"data", "teacher", "student", "teacher_logits"}  # progress kept, the killed stage not trusted
    assert any(Cache().tmp.iterdir())  # its half-written output: garbage, never read
    plan = {s["name"]: s for s in json.loads(cli("plan", toy, "--json").stdout)["stages"]}
    assert plan["student"]["status"] == "fresh" and plan["distill"]["reasons"] == ["new stage"]

    resumed = cli("build", toy)
    assert resumed.returncode == 0, resumed.stderr
    assert [ln.split()[1] for ln in resumed.stdout.splitlines() if ln.startswith("cached")] == \
        ["data", "teacher", "student", "teacher_logits"]
    assert not any(Cache().tmp.iterdir())  # the dead build's tmp dir was swept

    clean = cli("build", toy, env={"OPTFORGE_CACHE": str(optforge_env.root / "clean-cache")})
    assert clean.returncode == 0
    assert entries(optforge_env.cache) == entries(optforge_env.root / "clean-cache")


def test_concurrent_builds_one_refuses_clearly(cli, toy, optforge_env):
    started = optforge_env.root / "started.txt"
    first = cli("build", toy, env={"FAKE_SLEEP": "teacher:3", "FAKE_STARTED": str(started)}, background=True)
    wait_for_line(started, "teacher", first)
    second = cli("build", toy)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"error: another build of 'toy' is running (pid {first.pid}); "
                                     "wait for it to finish or pass --wait")
    waited = cli("build", toy, "--wait")  # blocks until the first is done, then finds nothing to do
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert waited.returncode == 0 and waited.stdout.splitlines()[-1] == "nothing to do: 21 stages fresh"
    assert len(entries(optforge_env.cache)) == len(set(Cache().keys()))  # every entry intact


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(cli, toy):
    bad = toy.parent / "bad.yaml"
    bad.write_text(toy.read_text().replace("temperature: 4.0", "temprature: 4.0"))
    result = cli("build", bad)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith(f"{bad}:8:")
    assert "did you mean 'temperature'" in result.stderr

    result = cli("build", toy, "--force", "distil")
    assert result.returncode == 2 and "no stage named 'distil'; did you mean 'distill'?" in result.stderr

    result = cli("build", toy, env={"FAKE_CRASH": "teacher"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: fake bug in teacher" in result.stderr
    assert "failed  teacher: RuntimeError: fake bug in teacher" in result.stdout


def test_validate_checks_every_file_and_fails_if_any_did(toy):
    bad1, missing, bad2 = (toy.parent / name for name in ("bad1.yaml", "gone.yaml", "bad2.yaml"))
    bad1.write_text(toy.read_text().replace("temperature: 4.0", "temperature: hot"))
    bad2.write_text(toy.read_text().replace("model: student}", "model: studnt}"))
    result = CliRunner().invoke(main, ["validate", *map(str, (bad1, toy, missing, bad2))])
    assert result.exit_code == 2
    assert result.stdout.splitlines() == [f"ok: {toy} (toy: 21 stages on cpu, 21 on cuda)"]
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == [str(bad1), str(missing), str(bad2)]


def test_trust_remote_code_needs_the_build_flag(cli, toy):
    toy.write_text(toy.read_text().replace("  finetune:", "  trust_remote_code: true\n  finetune:"))
    notice = ("teacher.trust_remote_code: true runs the Python code that comes with the model, on this machine; "
              "build with --trust-remote-code if you trust it")
    refused = cli("build", toy)
    assert refused.returncode == 2 and refused.stderr.splitlines() == [f"{toy}:6:22: error: {notice}"]
    assert not toy.with_suffix(".lock").exists()  # nothing ran
    assert cli("build", toy, "--dry-run").returncode == 0  # loads no model
    built = cli("build", toy, "--trust-remote-code")
    assert built.returncode == 0, built.stderr

    validated = CliRunner().invoke(main, ["validate", str(toy)])  # accepted, with a warning
    assert validated.exit_code == 0 and validated.stdout.startswith(f"ok: {toy}")
    assert validated.stderr.splitlines() == [f"{toy}:6:22: warning: {notice}"]


def test_gc_and_clean(toy):
    runner = CliRunner()
    assert runner.invoke(main, ["build", str(toy), "--device", "cpu"]).exit_code == 0
    n = len(list(Cache().keys()))
    toy.write_text(toy.read_text().replace("temperature: 4.0", "temperature: 2.0"))
    assert runner.invoke(main, ["build", str(toy), "--device", "cpu"]).exit_code == 0
    dry = runner.invoke(main, ["gc", "--dry-run"])
    assert dry.exit_code == 0 and dry.stdout.splitlines()[-1] == "gc: 12 to remove, 21 kept"
    assert len(list(Cache().keys())) == n + 12
    assert runner.invoke(main, ["gc"]).stdout.splitlines()[-1] == "gc: 12 removed, 21 kept"
    assert runner.invoke(main, ["build", str(toy)]).stdout.splitlines()[-1] == "nothing to do: 21 stages fresh"

    cleaned = runner.invoke(main, ["clean", str(toy)])
    assert cleaned.exit_code == 0 and not toy.with_suffix(".lock").exists()
    assert runner.invoke(main, ["gc"]).stdout.splitlines()[-1] == "gc: 21 removed, 0 kept"
    assert runner.invoke(main, ["clean", str(toy)]).stdout.startswith("clean: nothing recorded")


def test_dag_formats(toy):
    mermaid = CliRunner().invoke(main, ["dag", str(toy)])
    assert mermaid.exit_code == 0 and mermaid.stdout.startswith("flowchart TD")
    dot = CliRunner().invoke(main, ["dag", str(toy), "--format", "dot"])
    assert '"distill" -> "prune:pruned" [label="model"];' in dot.stdout


def test_report_rerenders_from_the_cache_without_running(toy, monkeypatch, optforge_env):
    import optforge.report

    calls = []

    def render_reports(**kw):
        calls.append(kw)
        return [kw["out_dir"] / "report.md"]

    monkeypatch.setattr(optforge.report, "render_reports", render_reports)
    runner = CliRunner()
    runner.invoke(main, ["build", str(toy), "--until", "teacher"])
    previous = optforge_env.root / "old.md"
    previous.write_text("# old\n")
    result = runner.invoke(main, ["report", str(toy), "--compare", str(previous)])
    assert result.exit_code == 0, result.output
    kw = calls[-1]
    assert kw["compare"] == previous and kw["out_dir"] == Path("reports") / "toy"
    assert kw["results"]["teacher"]["status"] == "ok" and kw["results"]["distill"]["status"] == "missing"
    assert "ran" not in result.stdout and not (Cache().root / "locks" / "toy.lock").read_text() == ""


def test_dry_run_and_until_via_cli(toy):
    runner = CliRunner()
    dry = runner.invoke(main, ["build", str(toy), "--dry-run", "--until", "student"])
    assert dry.stdout.splitlines() == ["would run data  (new stage)", "would run teacher  (new stage)",
                                       "would run student  (new stage)", "dry run: 3 would run, 0 fresh"]
    result = runner.invoke(main, ["build", str(toy), "--until", "student"])
    assert [ln.split()[0] for ln in result.stdout.splitlines()[:3]] == ["ran", "ran", "ran"]
    assert os.path.exists(toy.with_suffix(".lock"))


@pytest.mark.parametrize("flag,value", [("--max-wait-ms", "inf"), ("--max-wait-ms", "nan"), ("--max-wait-ms", "-1"),
                                        ("--max-wait-ms", "1e9"), ("--header-timeout-s", "inf"),
                                        ("--body-timeout-s", "nan"), ("--body-timeout-s", "0"),
                                        ("--max-connections", "0")])
def test_serve_refuses_a_non_finite_or_out_of_range_option_before_loading_anything(toy, flag, value):
    result = CliRunner().invoke(main, ["serve", str(toy), flag, value])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} must be "), result.output
