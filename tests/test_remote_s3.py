"""The remote cache against a real S3 server (SeaweedFS, started here on 127.0.0.1: tests/object_store.py),
never a mock of the S3 API: machine A builds recipes/tiny.yaml and pushes, machine B builds it with
nothing to run; a push killed mid-way; concurrent publishers of one key; a tampered blob; the errors of
a remote that refuses the credentials, has none, or does not answer. Each test works under a prefix of
its own in one bucket."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import object_store
from optforge.cache import verify_entry
from optforge.cli import main
from optforge.lockfile import read_lock
from optforge_testing import copy_built, run_cli, shared_data_root
from test_remote import machine, race_publishers


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    try:
        s = object_store.start(tmp_path_factory.mktemp("seaweedfs"))
    except object_store.StoreUnavailable as e:
        pytest.skip(f"no S3 server for these tests: {e}")
    yield s
    s.stop()


@pytest.fixture
def remote_url(store, monkeypatch):
    """A fresh prefix in the bucket, and this process's environment pointed at the store."""
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPTFORGE_REMOTE", raising=False)
    return store.url(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def toys(tmp_path, monkeypatch, fake_kinds):
    monkeypatch.chdir(tmp_path)
    return tmp_path, fake_kinds


def published(store, url: str) -> dict[str, dict]:
    """key -> manifest of every entry under `url`, read straight from the bucket."""
    fs = store.filesystem()
    prefix = url.removeprefix("s3://")
    return {Path(p).stem: json.loads(fs.cat_file(p)) for p in fs.glob(f"{prefix}/entries/*/*.json")}


def whole(store, url: str, m: dict) -> bool:
    """Every blob the manifest names is in the bucket with its sha256."""
    fs = store.filesystem()
    prefix = url.removeprefix("s3://")
    return all(hashlib.sha256(fs.cat_file(f"{prefix}/blobs/{i['sha256'][:2]}/{i['sha256']}")).hexdigest() == i["sha256"]
               for i in m["files"].values())


def test_machine_b_builds_tiny_with_nothing_to_train(built_tiny, store, remote_url, tmp_path):
    a = copy_built(built_tiny, tmp_path / "a")
    env = store.env | {"OPTFORGE_REMOTE": remote_url}
    push = a.run("push", a.recipe, "--device", "cpu", env=env)
    assert push.returncode == 0, push.stdout + push.stderr
    lock = read_lock(a.recipe.with_suffix(".lock"))
    n = len(lock["stages"])
    assert push.stdout.splitlines()[-1] == f"push {remote_url}: {n} published"
    assert len(published(store, remote_url)) == n

    # machine B: a checkout of the project (recipe and its committed lock file), an empty cache
    b = tmp_path / "b"
    (b / "recipes").mkdir(parents=True)
    shutil.copy(a.recipe, b / "recipes")
    shutil.copy(a.recipe.with_suffix(".lock"), b / "recipes")
    result = run_cli("build", b / "recipes" / "tiny.yaml", "--device", "cpu", cwd=b, cache=b / "cache", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("ran ")], result.stdout  # nothing trained, nothing run
    assert sum(line.startswith("pulled ") for line in lines) == n
    assert lines[-1].startswith(f"build: 0 ran, 0 cached, {n} pulled in ")
    assert read_lock(b / "recipes" / "tiny.lock") == lock
    ours, theirs = (json.loads((root / "reports" / "tiny" / "results.json").read_text()) for root in (b, a.root))
    assert ours["configs"] == theirs["configs"] and ours["best"] == theirs["best"]
    # nothing secret anywhere B wrote outside its cache
    for path in [*(b / "reports").rglob("*"), b / "recipes" / "tiny.lock"]:
        if path.is_file():
            text = path.read_text(errors="replace")
            assert store.secret_key not in text and store.access_key not in text


def test_a_killed_push_leaves_nothing_that_b_trusts(store, remote_url, toys):
    root, fake_kinds = toys
    a, b = machine(root, "a", fake_kinds), machine(root, "b", fake_kinds)
    assert a.build().exit_code == 0
    shutil.copy(a.lock, b.lock)
    env = dict(os.environ, OPTFORGE_CACHE=str(a.cache.root), OPTFORGE_DATA_ROOT=str(shared_data_root()),
               PYTHONUNBUFFERED="1")
    push = subprocess.Popen([sys.executable, "-m", "optforge.cli", "push", str(a.recipe), "--device", "cpu",
                             "--remote", remote_url], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        for line in push.stdout:
            if line.startswith("published"):
                push.send_signal(signal.SIGKILL)  # mid-way through the next entry's uploads
                break
    finally:
        push.kill()
        push.wait(30)
    assert push.returncode == -signal.SIGKILL
    there = published(store, remote_url)
    assert 1 <= len(there) < 21, f"the push was not stopped mid-way ({len(there)} of 21 published)"
    assert all(whole(store, remote_url, m) for m in there.values())  # a manifest only after all its blobs

    result = b.build(remote=remote_url)
    keys = {name: r["key"] for name, r in read_lock(a.lock)["stages"].items()}
    assert sorted(result.pulled) == sorted(name for name, key in keys.items() if key in there)
    assert sorted(result.ran) == sorted(name for name, key in keys.items() if key not in there)
    assert not result.logs  # blobs without a manifest are no entry: nothing to warn about
    for key in b.cache.keys():
        verify_entry(b.cache.entry_dir(key))

    # pushing again completes what the killed push began
    again = CliRunner().invoke(main, ["push", str(a.recipe), "--device", "cpu", "--remote", remote_url],
                               env={"OPTFORGE_CACHE": str(a.cache.root)})
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[-1] == f"push {remote_url}: {21 - len(there)} published, {len(there)} present"


def test_concurrent_publishers_of_one_key(store, remote_url, toys):
    """Four writers with other metrics for the same key, released at once: one manifest gets in, the rest
    find it present. Then two whole `optforge push` processes race: every key is published once."""
    root, fake_kinds = toys
    a = machine(root, "a", fake_kinds)
    a.build()
    race_publishers(remote_url, a, 4)  # S3's conditional PUT (If-None-Match: *) lets one in

    url = f"{remote_url}-race"
    env = dict(os.environ, OPTFORGE_CACHE=str(a.cache.root), OPTFORGE_DATA_ROOT=str(shared_data_root()))
    cmd = [sys.executable, "-m", "optforge.cli", "push", str(a.recipe), "--device", "cpu", "--remote", url]
    pushers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in pushers]
    assert [p.returncode for p in pushers] == [0, 0], outputs
    counts = [sum(line.startswith("published") for line in out.splitlines()) for out, _ in outputs]
    assert sum(counts) == 21, outputs  # each key published by exactly one of them
    there = published(store, url)
    assert len(there) == 21 and all(whole(store, url, m) for m in there.values())


def test_a_tampered_blob_is_rejected(store, remote_url, toys):
    root, fake_kinds = toys
    a, b = machine(root, "a", fake_kinds), machine(root, "b", fake_kinds)
    assert a.build(remote=remote_url, push=True, until="distill").pushed == [
        "data", "teacher", "student", "teacher_logits", "distill"]
    shutil.copy(a.lock, b.lock)
    key = read_lock(a.lock)["stages"]["distill"]["key"]
    sha = published(store, remote_url)[key]["files"]["weights.bin"]["sha256"]
    blob = f"{remote_url.removeprefix('s3://')}/blobs/{sha[:2]}/{sha}"
    fs = store.filesystem()
    data = bytearray(fs.cat_file(blob))
    data[-1] ^= 1
    fs.pipe_file(blob, bytes(data))

    result = b.build(remote=remote_url, until="distill")
    assert result.ran == ["distill"] and result.pulled == ["data", "teacher", "student", "teacher_logits"]
    assert result.logs == ["warning: remote entry of distill ignored: weights.bin: sha256 mismatch "
                           "(a tampered or partial blob); running it here"]
    verify_entry(b.cache.entry_dir(key))


def test_refused_missing_unreachable_and_bucketless_remotes_are_one_line(store, remote_url, toys, monkeypatch):
    root, fake_kinds = toys
    a = machine(root, "a", fake_kinds)
    monkeypatch.setenv("OPTFORGE_CACHE", str(a.cache.root))
    args = ["build", str(a.recipe), "--device", "cpu", "--remote", remote_url]

    wrong = CliRunner().invoke(main, args, env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert wrong.exit_code == 2 and len(wrong.stderr.splitlines()) == 1 and "Traceback" not in wrong.output
    assert wrong.stderr.startswith(f"error: remote cache {remote_url}: reading ") and " refused (" in wrong.stderr

    none = CliRunner().invoke(main, args, env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None})
    assert none.exit_code == 2 and none.stderr.startswith(f"error: remote cache {remote_url}: no credentials")

    closed = object_store.free_ports(1)[0]
    down = CliRunner().invoke(main, args, env={"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed}",
                                               "AWS_MAX_ATTEMPTS": "1"})
    assert down.exit_code == 2 and down.stderr.startswith(f"error: remote cache {remote_url}: cannot reach it")
    assert "--remote none" in down.stderr
    nobucket = CliRunner().invoke(main, ["build", str(a.recipe), "--device", "cpu", "--remote", "s3://no-such-bucket/x"])
    assert nobucket.exit_code == 2 and nobucket.stderr.startswith("error: remote cache s3://no-such-bucket/x: ")
    assert "bucket does not exist" in nobucket.stderr
    for result in (wrong, none, down, nobucket):
        assert store.secret_key not in result.output and len(result.stderr.splitlines()) == 1
    assert not list(a.cache.keys())  # refused before any stage ran
