"""The remote cache (issue 13, part 1) without a server: URL checks, the recipe's `cache` section, the
remote manifest's checks, and whole builds of the toy recipe (fake stages) between two "machines" (two
project folders, two local caches) through a file:// remote. The same against a real S3 server, and the
real tiny recipe: tests/test_remote_s3.py."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from optforge.cache import Cache, verify_entry
from optforge.cli import main
from optforge.errors import RecipeError, RemoteError
from optforge.fingerprint import write_json_atomic
from optforge.lockfile import read_lock
from optforge.remote import Remote, manifest_problem, remote_manifest
from optforge.remote_url import check_remote, redact
from optforge.run import build
from optforge.sync import remote_setting

HARDWARE_BOUND = {"evaluate", "benchmark", "quantize", "compile", "onnxruntime", "serve_benchmark"}


# --------------------------------------------------------------------------- machines


def machine(root: Path, name: str, fake_kinds, recipe_text: str | None = None) -> SimpleNamespace:
    """A project folder with the toy recipe and its own local cache: what one machine has."""
    recipe = fake_kinds.write_toy(root / name / "recipes", *([recipe_text] if recipe_text else []))
    m = SimpleNamespace(name=name, recipe=recipe, cache=Cache(root / name / "cache"), lock=recipe.with_suffix(".lock"))

    def run(**kw):
        lines, logs = [], []
        result = build(recipe, device="cpu", cache=m.cache, echo=lines.append, log=logs.append, progress=False,
                       render_report=False, **kw)
        result.lines, result.logs = lines, logs
        return result

    m.build = run
    return m


@pytest.fixture
def machines(tmp_path, monkeypatch, fake_kinds):
    monkeypatch.delenv("OPTFORGE_REMOTE", raising=False)
    monkeypatch.chdir(tmp_path)
    return SimpleNamespace(a=machine(tmp_path, "a", fake_kinds), b=machine(tmp_path, "b", fake_kinds),
                           remote=f"file://{tmp_path / 'remote'}", root=tmp_path / "remote", tmp=tmp_path,
                           fake_kinds=fake_kinds)


def kinds_of(names) -> set[str]:
    return {n.split(":")[0] for n in names}


def entries(root: Path) -> dict[str, dict]:
    """key -> manifest of every entry published under a file:// remote's folder."""
    return {p.stem: json.loads(p.read_text()) for p in (root / "entries").glob("*/*.json")}


# --------------------------------------------------------------------------- URLs and the recipe


@pytest.mark.parametrize("url, kept", [
    ("s3://bucket/prefix/", "s3://bucket/prefix"),
    ("S3://bucket", "s3://bucket"),
    ("gs://b/p", "gs://b/p"),
    ("file:///srv/cache", "file:///srv/cache"),
    ("ssh://builder@host/srv/cache", "ssh://builder@host/srv/cache"),
])
def test_good_urls_are_kept_normalised(url, kept):
    assert check_remote(url) == kept


@pytest.mark.parametrize("url, says", [
    ("bucket/prefix", "is not a URL"),
    ("s3://", "names no bucket or host"),
    ("file://relative/dir", "needs an absolute path"),
    ("simplecache::s3://b/p", "chains filesystems"),
    ("s3://b/p?X-Amz-Signature=s3cr3t", "query string"),
    ("ssh://me:s3cr3t@host/p", "carries a password"),
])
def test_bad_urls_are_refused_without_echoing_a_secret(url, says):
    with pytest.raises(ValueError, match=says) as info:
        check_remote(url)
    assert "s3cr3t" not in str(info.value)


def test_redact_drops_userinfo_queries_and_fragments():
    assert redact("ssh://me:s3cr3t@host/p") == "ssh://host/p"
    assert redact("ssh://builder@host/srv/cache") == "ssh://host/srv/cache"
    assert redact("s3://b/p?token=s3cr3t#frag") == "s3://b/p"
    assert redact("s3://b/p") == "s3://b/p"


def test_recipe_cache_section_is_checked_and_located(tmp_path, fake_kinds, monkeypatch):
    from optforge.recipe_io import load_recipe

    monkeypatch.chdir(tmp_path)
    base = fake_kinds.TOY_RECIPE
    bad = fake_kinds.write_toy(tmp_path / "bad", base + 'cache: {remote: "s3://me:s3cr3t@bucket/x"}\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(bad, "bad/toy.yaml")
    line = len(base.splitlines()) + 1
    assert info.value.located().startswith(f"bad/toy.yaml:{line}:")
    assert "cache.remote" in info.value.located() and "carries a password" in info.value.located()
    assert "s3cr3t" not in info.value.located()
    typo = fake_kinds.write_toy(tmp_path / "typo", base + "cache: {remote: s3://bucket/x, pushh: true}\n")
    with pytest.raises(RecipeError, match="pushh"):
        load_recipe(typo, "typo/toy.yaml")


def test_cache_section_enters_no_key_and_not_the_recipe_hash(tmp_path, fake_kinds, monkeypatch):
    from optforge.session import open_session

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTFORGE_CACHE", str(tmp_path / "cache"))
    plain = open_session(fake_kinds.write_toy(tmp_path / "plain"), "cpu")
    shared = open_session(fake_kinds.write_toy(tmp_path / "shared", fake_kinds.TOY_RECIPE +
                                               "cache: {remote: s3://bucket/team, push: true}\n"), "cpu")
    assert shared.recipe.cache.remote == "s3://bucket/team" and shared.recipe.cache.push
    assert [p.key for p in plain.plan()] == [p.key for p in shared.plan()]
    assert plain.env()["recipe_hash"] == shared.env()["recipe_hash"]


def test_remote_setting_flag_over_env_over_recipe():
    recipe = SimpleNamespace(cache=SimpleNamespace(remote="s3://from/recipe", push=True))
    env = {"OPTFORGE_REMOTE": "s3://from/env"}
    assert remote_setting(recipe, "s3://from/flag", env).url == "s3://from/flag"
    assert remote_setting(recipe, None, env) == remote_setting(recipe, None, env)
    assert remote_setting(recipe, None, env).url == "s3://from/env"
    assert remote_setting(recipe, None, {}).url == "s3://from/recipe"
    assert remote_setting(recipe, None, {}).push is True
    assert remote_setting(recipe, None, {}, push=False).push is False
    assert remote_setting(recipe, "none", env) is None
    assert remote_setting(None, None, {"OPTFORGE_REMOTE": "off"}) is None
    with pytest.raises(RemoteError, match="--push needs a remote"):
        remote_setting(None, None, {}, push=True)
    with pytest.raises(RemoteError, match="^OPTFORGE_REMOTE: 'bucket' is not a URL"):
        remote_setting(None, None, {"OPTFORGE_REMOTE": "bucket"})


# --------------------------------------------------------------------------- the manifest


GOOD = {"format": 1, "key": "a" * 64, "kind": "teacher", "stage": "teacher", "status": "ok", "reason": None,
        "metrics": {"accuracy": 0.5}, "device": None,
        "files": {"model.safetensors": {"size": 3, "sha256": "b" * 64}, "tokenizer/vocab.txt": {"size": 0, "sha256": "c" * 64}}}


@pytest.mark.parametrize("change, says", [
    ({"key": "d" * 64}, "names another key"),
    ({"format": 2}, "manifest format 2"),
    ({"status": "maybe"}, "no valid kind or status"),
    ({"files": {"../../.bashrc": {"size": 1, "sha256": "b" * 64}}}, "unsafe path"),
    ({"files": {"/etc/passwd": {"size": 1, "sha256": "b" * 64}}}, "unsafe path"),
    ({"files": {"a/./b": {"size": 1, "sha256": "b" * 64}}}, "unsafe path"),
    ({"files": {"manifest.json": {"size": 1, "sha256": "b" * 64}}}, "unsafe path"),
    ({"files": {"w": {"size": -1, "sha256": "b" * 64}}}, "no valid size and sha256"),
    ({"files": {"w": {"size": 1, "sha256": "B" * 64}}}, "no valid size and sha256"),
    ({"files": {"w": {"size": True, "sha256": "b" * 64}}}, "no valid size and sha256"),
    ({"files": {"w": {"size": 1, "sha256": "b" * 64}, "w/x": {"size": 1, "sha256": "b" * 64}}}, "under a file"),
    ({"status": "failed", "reason": "unsupported"}, "must have a reason and no files"),
])
def test_manifest_problems_are_named(change, says):
    assert manifest_problem(GOOD, "a" * 64) is None
    assert says in manifest_problem(GOOD | change, "a" * 64)


def test_remote_manifest_drops_mtimes_and_carries_the_device():
    local = {"format": 1, "key": "a" * 64, "kind": "benchmark", "stage": "benchmark:x", "status": "ok", "reason": None,
             "metrics": {}, "files": {"w": {"size": 1, "sha256": "b" * 64, "mtime_ns": 123}}}
    m = remote_manifest(local, {"kind": "cpu", "name": "Xeon"})
    assert m["files"] == {"w": {"size": 1, "sha256": "b" * 64}} and m["device"] == {"kind": "cpu", "name": "Xeon"}
    assert manifest_problem(m, "a" * 64) is None


# --------------------------------------------------------------------------- builds through a file:// remote


def test_machine_b_pulls_what_a_pushed_and_runs_only_code_its_lock_does_not_record(machines):
    a, b = machines.a, machines.b
    first = a.build(remote=machines.remote, push=True)
    assert first.exit_code == 0 and len(first.ran) == 21 and sorted(first.pushed) == sorted(first.ran)
    published = entries(machines.root)
    assert len(published) == 21 and all(m["key"] == k for k, m in published.items())
    blobs = {p.name for p in (machines.root / "blobs").glob("*/*")}
    assert blobs == {info["sha256"] for m in published.values() for info in m["files"].values()}
    assert not list((machines.root / "tmp").iterdir())  # staging names are renamed away or removed

    second = b.build(remote=machines.remote)  # a fresh checkout: no lock file yet
    assert second.ran == ["compile:compiled"], second.lines
    assert len(second.pulled) == 20 and second.exit_code == 0
    assert any("compile:compiled not used: it holds code" in line for line in second.logs)
    for key in b.cache.keys():
        verify_entry(b.cache.entry_dir(key))  # every pulled file is what its manifest says

    # with A's lock file (committed beside the recipe) B takes A's compiled code too
    shutil.rmtree(b.cache.root)
    shutil.copy(a.lock, b.lock)
    third = b.build(remote=machines.remote)
    assert third.ran == [] and len(third.pulled) == 21
    assert third.summary.startswith("build: 0 ran, 0 cached, 21 pulled")
    assert read_lock(b.lock) == read_lock(a.lock)
    assert b.build(remote=machines.remote).summary == "nothing to do: 21 stages fresh"


def test_a_no_op_build_never_contacts_the_remote_nor_imports_fsspec(cli, optforge_env, fake_kinds):
    toy = fake_kinds.write_toy(optforge_env.root / "recipes")
    assert build(toy, device="cpu", echo=lambda _: None, progress=False, render_report=False).exit_code == 0
    mods = optforge_env.root / "modules.txt"
    # no such bucket, no credentials: only a stale stage would reach for it
    again = cli("build", toy, "--device", "cpu", "--remote", "s3://no-such-bucket/x", "--push", modules_out=mods)
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "nothing to do: 21 stages fresh"
    assert not {"fsspec", "s3fs", "botocore"} & set(mods.read_text().split())


def test_a_failed_upload_is_a_warning_and_exit_status_2(machines):
    """The remote answers (its entries can be read) but cannot take blobs: every stage still runs and is
    sealed here; each upload failure is a warning line, and the build exits 2."""
    machines.root.mkdir()
    (machines.root / "blobs").write_text("not a directory")
    result = machines.a.build(remote=machines.remote, push=True, until="teacher")
    assert result.ran == ["data", "teacher"] and result.push_failed == ["data", "teacher"]
    assert result.exit_code == 2 and not result.pushed
    assert len(result.logs) == 2 and result.logs[0].startswith(f"warning: data was not pushed: remote cache "
                                                               f"{machines.remote}: uploading to ")
    assert result.summary.startswith("build: 2 ran, 0 cached, 2 not pushed (see the warnings) in ")
    assert machines.a.build(until="teacher").summary == "nothing to do: 2 stages fresh"


def test_hardware_bound_entries_never_cross_devices(machines):
    from optforge.device import _boot_id, probe_cpu

    a, b = machines.a, machines.b
    a.build(remote=machines.remote, push=True)
    shutil.copy(a.lock, b.lock)
    other = probe_cpu() | {"name": "Another CPU Model"}
    write_json_atomic(b.cache.root / "device.json", {f"{_boot_id()}|cpu|": other})
    result = b.build(remote=machines.remote)
    assert kinds_of(result.pulled) == {"data", "teacher", "student", "teacher_logits", "distill", "prune"}  # trained: shared
    assert kinds_of(result.ran) == {"evaluate", "benchmark", "quantize", "compile"}  # measured here
    assert len(result.pulled) + len(result.ran) == 21
    assert not result.logs  # kept apart by their keys (the device is in them), not by a refused manifest


def test_a_forged_device_in_a_manifest_is_not_trusted(machines):
    a, b = machines.a, machines.b
    a.build(remote=machines.remote, push=True)
    shutil.copy(a.lock, b.lock)
    keys = {n: r["key"] for n, r in read_lock(a.lock)["stages"].items()}
    path = machines.root / "entries" / keys["benchmark:baseline"][:2] / f"{keys['benchmark:baseline']}.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps(m | {"device": m["device"] | {"name": "Forged"}}))
    result = b.build(remote=machines.remote)
    assert result.ran == ["benchmark:baseline"]
    assert any("benchmark:baseline not used: made on another device (cpu: Forged" in line for line in result.logs)


def test_partial_uploads_are_never_trusted(machines):
    """What a push killed at each point leaves: blobs without a manifest; a manifest whose blob never came
    (a store without ordering); half a manifest (a store without atomic writes)."""
    a, b = machines.a, machines.b
    a.build()
    shutil.copy(a.lock, b.lock)
    keys = {n: r["key"] for n, r in read_lock(a.lock)["stages"].items()}
    remote = Remote(machines.remote)
    for name in ("teacher", "student", "distill"):
        m = remote_manifest(a.cache.manifest(keys[name]), None)
        remote.publish(a.cache.entry_dir(keys[name]), m)
    # teacher: its blobs are there, the manifest is not (killed before the manifest)
    Path(remote.entry_path(keys["teacher"])).unlink()
    # student: the manifest is there, one blob is not
    student = entries(machines.root)[keys["student"]]
    Path(remote.blob_path(student["files"]["weights.bin"]["sha256"])).unlink()
    # distill: half a manifest
    path = Path(remote.entry_path(keys["distill"]))
    path.write_bytes(path.read_bytes()[:40])

    result = b.build(remote=machines.remote)
    assert not result.pulled and len(result.ran) == 21
    warnings = "\n".join(result.logs)
    assert "remote entry of student ignored: blob of weights.bin is missing" in warnings
    assert "remote entry of distill ignored: manifest is not JSON" in warnings
    assert "teacher" not in warnings  # no manifest, no entry: nothing to warn about
    for key in b.cache.keys():
        verify_entry(b.cache.entry_dir(key))


def test_a_tampered_blob_is_rejected_and_a_push_repairs_it(machines, tmp_path, fake_kinds):
    a, b = machines.a, machines.b
    a.build(remote=machines.remote, push=True)
    shutil.copy(a.lock, b.lock)
    teacher = read_lock(a.lock)["stages"]["teacher"]["key"]
    sha = entries(machines.root)[teacher]["files"]["weights.bin"]["sha256"]
    blob = machines.root / "blobs" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    data[0] ^= 1  # same size, one bit off
    blob.write_bytes(bytes(data))

    result = b.build(remote=machines.remote, push=True)
    assert result.ran == ["teacher"] and len(result.pulled) == 20 and result.exit_code == 0
    assert any("remote entry of teacher ignored: weights.bin: sha256 mismatch" in line for line in result.logs)
    verify_entry(b.cache.entry_dir(teacher))
    # B's push replaced the bad blob (its own teacher has the same bytes): a third machine pulls everything
    c = machine(tmp_path, "c", fake_kinds)
    shutil.copy(a.lock, c.lock)
    third = c.build(remote=machines.remote)
    assert len(third.pulled) == 21 and not third.logs


def race_publishers(url: str, m: SimpleNamespace, writers: int) -> tuple[int, dict]:
    """`writers` threads publish machine `m`'s teacher entry under `url` at once, each with other metrics:
    (the winner's number, what each got). Asserts that exactly one published and the rest found it
    present, and that the manifest there is the winner's."""
    key = read_lock(m.lock)["stages"]["teacher"]["key"]
    base = remote_manifest(m.cache.manifest(key), None)
    start, outcomes = threading.Barrier(writers), {}

    def publish(i):
        remote = Remote(url)
        remote.fs  # noqa: B018 -- connect before the barrier, so that the writes are what race
        start.wait()
        outcomes[i] = remote.publish(m.cache.entry_dir(key), base | {"metrics": {"writer": i}})

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, outcome in outcomes.items() if outcome == "published"]
    assert len(winners) == 1 and list(outcomes.values()).count("present") == writers - 1, outcomes
    there, problem = Remote(url).manifest(key)
    assert problem is None and there["metrics"] == {"writer": winners[0]}
    return winners[0], outcomes


def test_concurrent_publishers_of_one_key_leave_one_whole_entry(machines):
    """Writers with other metrics for the same key, released at once: one wins (a hard link on a local
    filesystem), the others find its entry present."""
    machines.a.build()
    race_publishers(machines.remote, machines.a, 8)


# --------------------------------------------------------------------------- the commands


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_push_and_pull_commands(machines, monkeypatch):
    a, b = machines.a, machines.b
    monkeypatch.setenv("OPTFORGE_CACHE", str(a.cache.root))
    assert invoke("build", a.recipe, "--device", "cpu").exit_code == 0
    pushed = invoke("push", a.recipe, "--device", "cpu", "--remote", machines.remote)
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout.splitlines()[-1] == f"push {machines.remote}: 21 published"
    again = invoke("push", a.recipe, "--device", "cpu", "--remote", machines.remote)
    assert again.stdout.splitlines()[-1] == f"push {machines.remote}: 21 present"

    monkeypatch.setenv("OPTFORGE_CACHE", str(b.cache.root))
    shutil.copy(a.lock, b.lock)
    pulled = invoke("pull", b.recipe, "--device", "cpu", "--until", "distill", env={"OPTFORGE_REMOTE": machines.remote})
    assert pulled.exit_code == 0, pulled.output
    assert pulled.stdout.splitlines() == ["pulled      data", "pulled      teacher", "pulled      student",
                                          "pulled      teacher_logits", "pulled      distill",
                                          f"pull {machines.remote}: 5 pulled"]
    plan = invoke("plan", b.recipe, "--device", "cpu")
    assert [line.split()[:2] for line in plan.stdout.splitlines()[:5]] == [
        ["fresh", "data"], ["fresh", "teacher"], ["fresh", "student"], ["fresh", "teacher_logits"], ["fresh", "distill"]]


def test_remote_errors_are_one_line(machines, monkeypatch):
    a = machines.a
    monkeypatch.setenv("OPTFORGE_CACHE", str(a.cache.root))
    none = invoke("push", a.recipe, "--device", "cpu")
    assert none.exit_code == 2 and none.stderr == (f"error: no remote cache to push: set cache.remote in {a.recipe}, "
                                                   "OPTFORGE_REMOTE, or --remote URL\n")
    bad = invoke("build", a.recipe, "--device", "cpu", env={"OPTFORGE_REMOTE": "ssh://me:s3cr3t@host/x"})
    assert bad.exit_code == 2 and len(bad.stderr.splitlines()) == 1 and "s3cr3t" not in bad.output
    assert bad.stderr.startswith("error: OPTFORGE_REMOTE: 'ssh://host/x' carries a password")
    gcs = invoke("build", a.recipe, "--device", "cpu", "--remote", "gs://bucket/x")
    assert gcs.exit_code == 2 and "Traceback" not in gcs.output
    assert gcs.stderr.startswith("error: remote cache gs://bucket/x: gs:// needs gcsfs")
    assert not list(a.cache.keys())  # nothing ran before the remote was checked
