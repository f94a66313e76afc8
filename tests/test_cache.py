"""The content-addressed store: sealing, trust, corruption, locks, registry, gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from optforge.cache import MANIFEST, Cache
from optforge.errors import CacheError
from optforge.fingerprint import FileHashes, sha256_json
from optforge.lockfile import lock_path, read_lock, write_lock

K1, K2, K3 = (sha256_json(i) for i in range(3))


@pytest.fixture
def cache(tmp_path):
    return Cache(tmp_path / "cache")


def _bump_mtime(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


def seal(cache: Cache, key: str, files: dict[str, bytes] | None = None, **kw):
    tmp = cache.new_tmp()
    for rel, data in (files or {"model.safetensors": b"w" * 100, "tok/vocab.txt": b"a\nb\n"}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    args = {"status": "ok", "metrics": {"acc": 0.5}, "reason": None, "kind": "k", "stage": "s"} | kw
    return cache.commit(tmp, key, **args)


def test_commit_seals_an_entry_with_a_manifest(cache):
    state = seal(cache, K1)
    assert state.status == "ok" and state.metrics == {"acc": 0.5}
    entry = cache.entry_dir(K1)
    assert entry == cache.root / "objects" / K1[:2] / K1
    m = json.loads((entry / MANIFEST).read_text())
    assert m["key"] == K1 and m["status"] == "ok" and m["kind"] == "k" and m["stage"] == "s"
    assert set(m["files"]) == {"model.safetensors", "tok/vocab.txt"}
    assert m["files"]["model.safetensors"]["size"] == 100 and len(m["files"]["model.safetensors"]["sha256"]) == 64
    assert not any(cache.tmp.iterdir())  # the tmp dir was renamed, not copied


def test_entry_without_valid_manifest_is_not_trusted(cache):
    seal(cache, K1)
    (cache.entry_dir(K1) / MANIFEST).unlink()
    assert cache.state(K1).status == "missing"
    seal(cache, K2)
    m = json.loads((cache.entry_dir(K2) / MANIFEST).read_text())
    (cache.entry_dir(K2) / MANIFEST).write_text(json.dumps(m | {"key": K3}))  # moved/copied entry
    assert cache.state(K2).status == "missing"
    (cache.entry_dir(K2) / MANIFEST).write_text('{"key": "' + K2 + '", "status": "ok", "fil')  # torn write
    assert cache.state(K2).status == "missing"


def test_deleted_resized_and_flipped_files_are_corrupted(cache):
    seal(cache, K1)
    f = cache.entry_dir(K1) / "model.safetensors"
    f.write_bytes(b"w" * 99)
    assert cache.state(K1).reason == "model.safetensors size mismatch (99 bytes, expected 100)"
    f.write_bytes(b"x" * 100)  # same size: the moved mtime triggers a hash
    _bump_mtime(f)  # file mtimes tick with the kernel's coarse clock: make the move certain
    assert cache.state(K1).reason == "model.safetensors sha256 mismatch"
    f.unlink()
    assert cache.state(K1).reason == "model.safetensors missing"


def test_deep_check_catches_what_size_and_mtime_miss(cache):
    seal(cache, K1)
    f = cache.entry_dir(K1) / "model.safetensors"
    st = f.stat()
    f.write_bytes(b"x" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # a forged mtime
    assert cache.state(K1).status == "ok"  # the cheap check trusts size+mtime (documented policy)
    assert cache.state(K1, deep=True).reason == "model.safetensors sha256 mismatch"


def test_touched_file_is_rehashed_once_then_memoised(cache):
    seal(cache, K1)
    f = cache.entry_dir(K1) / "model.safetensors"
    os.utime(f, ns=(1, 1))
    assert cache.state(K1).status == "ok"
    cache.hashes.save()
    memo = FileHashes(cache.root / "fingerprints.json")
    assert memo.memo[str(f.absolute())]["mtime_ns"] == 1


def test_failed_entry_keeps_the_reason_not_the_files(cache):
    state = seal(cache, K1, status="failed", reason="int4 needs a GPU", metrics={})
    assert (state.status, state.reason) == ("failed", "int4 needs a GPU")
    assert sorted(p.name for p in cache.entry_dir(K1).iterdir()) == [MANIFEST]


def test_existing_entry_wins_unless_replace(cache):
    seal(cache, K1, {"a": b"first"})
    seal(cache, K1, {"a": b"second"})
    assert (cache.entry_dir(K1) / "a").read_bytes() == b"first"
    seal(cache, K1, {"a": b"third"}, replace=True)
    assert (cache.entry_dir(K1) / "a").read_bytes() == b"third"
    (cache.entry_dir(K1) / "a").write_bytes(b"XXXXX")  # corrupted: a new seal replaces it
    seal(cache, K1, {"a": b"fixed"})
    assert (cache.entry_dir(K1) / "a").read_bytes() == b"fixed" and cache.state(K1).status == "ok"


def test_cache_dirs_are_keys_only(cache):
    for bad in ("../../etc", "ab", K1.upper()):
        with pytest.raises(CacheError):
            cache.entry_dir(bad)
    with pytest.raises(CacheError, match="cannot name a lock file"):
        with cache.recipe_lock("../../x"):
            pass


def test_sweep_tmp_removes_only_dead_builders(cache):
    mine = cache.new_tmp()
    dead = cache.tmp / "999999999-abc"
    dead.mkdir()
    cache.sweep_tmp()
    assert mine.exists() and not dead.exists()


def test_second_build_of_a_recipe_is_refused_with_the_pid(cache):
    with cache.recipe_lock("sst2"):
        with pytest.raises(CacheError, match=rf"another build of 'sst2' is running \(pid {os.getpid()}\)"):
            with cache.recipe_lock("sst2"):
                pass
        with cache.recipe_lock("other"):  # a different recipe is not blocked
            pass


def test_wait_blocks_until_the_lock_is_free(cache):
    got = []
    with cache.recipe_lock("sst2"):
        def waiter():
            with cache.recipe_lock("sst2", wait=True):
                got.append(time.monotonic())
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.2)
        released = time.monotonic()
        assert not got
    t.join(5)
    assert got and got[0] >= released


def test_lock_held_by_another_process(cache, tmp_path):
    code = ("import sys,time; from optforge.cache import Cache; c=Cache(sys.argv[1])\n"
            "with c.recipe_lock('r'):\n print('locked', flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code, str(cache.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(CacheError, match=rf"pid {p.pid}\)"):
            with cache.recipe_lock("r"):
                pass
    finally:
        p.kill()
        p.wait()
    with cache.recipe_lock("r"):  # the kernel released it with the process
        pass


def test_registry_and_gc(cache, tmp_path):
    for k in (K1, K2, K3):
        seal(cache, k)
    a, b = tmp_path / "a.lock", tmp_path / "b.lock"
    write_lock(a, "a", {"s": {"key": K1}})
    write_lock(b, "b", {"s": {"key": K2}})
    cache.register(a)
    cache.register(b)
    cache.register(a)
    assert cache.registered() == [str(a), str(b)]

    dry = cache.gc(dry_run=True)
    assert dry.removed == [K3] and dry.kept == sorted([K1, K2]) and cache.state(K3).status == "ok"
    result = cache.gc()
    assert (result.removed, result.kept, result.forgotten) == ([K3], sorted([K1, K2]), [])
    assert cache.state(K3).status == "missing" and cache.state(K1).status == "ok"

    b.unlink()  # gone: gc cannot tell what it referred to, so it refuses until told to forget it
    with pytest.raises(CacheError, match="is missing"):
        cache.gc()
    assert cache.gc(dry_run=True, forget=[b]).removed == [K2] and str(b) in cache.registered()
    assert cache.gc(forget=[b]).removed == [K2]
    assert cache.registered() == [str(a)]
    with pytest.raises(CacheError, match="is not a registered lock file"):
        cache.gc(forget=[b])
    assert cache.unregister(a) and not cache.unregister(a)
    assert cache.gc().removed == [K1]


def test_gc_refuses_while_a_build_runs(cache):
    seal(cache, K1)
    with cache.recipe_lock("busy"):
        with pytest.raises(CacheError, match=r"a build is running \(busy\)"):
            cache.gc()
    assert cache.state(K1).status == "ok"


def test_lock_file_is_stable_and_only_written_on_change(tmp_path):
    path = lock_path(tmp_path / "recipes" / "sst2.yaml")
    assert path == tmp_path / "recipes" / "sst2.lock"
    stages = {"teacher": {"key": K1, "params": {"b": 1, "a": 2}}, "data": {"key": K2}}
    assert write_lock(path, "sst2", stages)
    text = path.read_text()
    assert text.index('"data"') < text.index('"teacher"') and text.index('"a"') < text.index('"b"')
    assert not write_lock(path, "sst2", dict(reversed(stages.items())))
    assert read_lock(path)["stages"]["teacher"]["key"] == K1
    path.write_text("{torn")
    assert read_lock(path) is None


def test_file_hash_memo(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("a\t1\n")
    memo = FileHashes(tmp_path / "fp.json")
    first = memo.sha256(f)
    memo.save()
    f.write_text("b\t0\n")
    _bump_mtime(f)
    again = FileHashes(tmp_path / "fp.json")
    assert again.sha256(f) != first  # size is equal but mtime moved


# --------------------------------------------------------------------------- issue 12: what loads, what gc keeps


def _forge(entry, rel: str, data: bytes, manifest: bool = False):
    """Rewrite `rel` keeping its size and mtime (bit rot, `cp -p`); with `manifest`, rewrite the manifest's
    record of it too, consistently (a tampered shared cache)."""
    f = entry / rel
    st = f.stat()
    f.write_bytes(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    if manifest:
        from optforge.fingerprint import file_sha256

        m = json.loads((entry / MANIFEST).read_text())
        m["files"][rel] |= {"size": len(data), "sha256": file_sha256(f), "mtime_ns": f.stat().st_mtime_ns}
        (entry / MANIFEST).write_text(json.dumps(m))


def test_verify_entry_hashes_every_file_and_names_the_damaged_one(cache):
    from optforge.cache import verify_entry

    seal(cache, K1)
    entry = cache.entry_dir(K1)
    assert verify_entry(entry)["key"] == K1
    _forge(entry, "tok/vocab.txt", b"x\ny\n")
    assert cache.state(K1).status == "ok"  # plan's cheap check trusts size+mtime (documented)
    with pytest.raises(CacheError, match=r"tok/vocab\.txt sha256 mismatch"):
        verify_entry(entry)

    seal(cache, K2)
    (cache.entry_dir(K2) / "extra.so").write_bytes(b"\x7fELF")  # a file the manifest does not list
    with pytest.raises(CacheError, match=r"extra\.so is not in its manifest"):
        verify_entry(cache.entry_dir(K2))
    assert cache.state(K2, deep=True).reason == "extra.so is not in its manifest"

    seal(cache, K3)
    (cache.entry_dir(K3) / MANIFEST).unlink()
    with pytest.raises(CacheError, match="no valid manifest.json"):
        verify_entry(cache.entry_dir(K3))


def test_entry_digest_covers_content_not_timestamps(cache):
    seal(cache, K1)
    entry = cache.entry_dir(K1)
    before = cache.state(K1).digest
    assert len(before) == 64
    os.utime(entry / "model.safetensors", ns=(1, 1))
    assert cache.state(K1).digest == before
    _forge(entry, "model.safetensors", b"v" * 100, manifest=True)  # consistent: the manifest agrees
    after = cache.state(K1, deep=True)
    assert after.status == "ok" and after.digest != before  # only a digest kept elsewhere can tell


def test_key_lock_makes_a_second_builder_wait_and_names_the_holder(cache):
    waited, order = [], []
    with cache.key_lock(K1):
        def second():
            with cache.key_lock(K1, on_wait=waited.append):
                order.append("second")
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(5)
    assert order == ["first done", "second"] and waited == [str(os.getpid())]
    with cache.key_lock(K1, on_wait=waited.append):  # free: no wait
        pass
    assert len(waited) == 1


def _registered(cache, tmp_path, name, key):
    lock = tmp_path / name / "recipes" / f"{name}.lock"
    lock.parent.mkdir(parents=True)
    write_lock(lock, name, {"s": {"key": key}})
    cache.register(lock)
    return lock


def test_gc_refuses_when_a_registered_lock_file_is_missing(cache, tmp_path):
    """A moved project (or a fresh CI checkout elsewhere) leaves its old absolute path in the registry:
    gc cannot prove its entries unreferenced, so it removes nothing."""
    for k in (K1, K2, K3):
        seal(cache, k)
    a = _registered(cache, tmp_path, "a", K1)
    _registered(cache, tmp_path, "b", K2)
    (tmp_path / "a").rename(tmp_path / "a-moved")
    with pytest.raises(CacheError, match=rf"registered lock file {a} is missing.*--forget-missing"):
        cache.gc()
    assert all(cache.state(k).status == "ok" for k in (K1, K2, K3)) and str(a) in cache.registered()
    result = cache.gc(forget_missing=True)  # the explicit way out
    assert (result.removed, result.kept, result.forgotten) == (sorted([K1, K3]), [K2], [str(a)])
    assert str(a) not in cache.registered()


def test_gc_refuses_when_a_registered_lock_file_is_unreadable(cache, tmp_path):
    seal(cache, K1)
    seal(cache, K2)
    a = _registered(cache, tmp_path, "a", K1)
    a.write_text("<<<<<<< HEAD\n" + a.read_text() + "=======\n{}\n>>>>>>> feature\n")  # a merge conflict
    with pytest.raises(CacheError, match=rf"registered lock file {a} is not an optforge lock file"):
        cache.gc(dry_run=True)
    with pytest.raises(CacheError, match=rf"optforge gc --forget {a}"):
        cache.gc()
    assert cache.state(K1).status == "ok" and cache.state(K2).status == "ok"
    assert cache.gc(forget=[a]).removed == sorted([K1, K2])


def test_lock_paths_are_unambiguous(tmp_path):
    d = tmp_path / "recipes"
    d.mkdir()
    # the common case keeps its old names (the committed recipes/sst2.lock and sst2.cuda.lock)
    assert lock_path(d / "sst2.yaml") == d / "sst2.lock" and lock_path(d / "sst2.yaml", "cuda") == d / "sst2.cuda.lock"
    # everything else is named after the whole file name, so no two recipes share a lock
    assert lock_path(d / "tiny.yml") == d / "tiny.yml.lock" != lock_path(d / "tiny.yaml")
    assert lock_path(d / "x.cuda.yaml") == d / "x.cuda.yaml.lock" != lock_path(d / "x.yaml", "cuda")
    assert lock_path(d / "x.cuda.yaml", "cuda") == d / "x.cuda.yaml.cuda.lock"
    names = ["a.yaml", "a.yml", "a.cuda.yaml", "a.cuda.yml", "a.b.yaml", "a", "a.json", "b.yaml"]
    paths = [lock_path(d / n, dev) for n in names for dev in ("cpu", "cuda")]
    assert len(set(paths)) == len(paths) - 2  # only "a" vs "a.yaml" collide (and are refused below)


def test_two_recipes_that_would_share_a_lock_are_refused(tmp_path):
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "x.yaml").write_text("name: x\n")
    (d / "x").write_text("name: x2\n")  # lock x.lock, like x.yaml's
    with pytest.raises(CacheError, match=r"x and .*x\.yaml would share the lock file .*x\.lock; rename one"):
        lock_path(d / "x.yaml")
    with pytest.raises(CacheError, match="would share the lock file"):
        lock_path(d / "x")
    (d / "y.cuda").write_text("")  # its cpu lock y.cuda.lock is y.yaml's cuda lock
    (d / "y.yaml").write_text("")
    assert lock_path(d / "y.yaml") == d / "y.lock"
    with pytest.raises(CacheError, match=r"y\.cuda\.lock"):
        lock_path(d / "y.yaml", "cuda")


def test_lock_file_recognises_only_its_own_format(tmp_path):
    from optforge.lockfile import is_optforge_lock

    path = tmp_path / "sst2.lock"
    write_lock(path, "sst2", {"s": {"key": K1}})
    assert is_optforge_lock(read_lock(path), "sst2") and not is_optforge_lock(read_lock(path), "other")
    for foreign in ({"stages": {}}, {"format": 1, "stages": {}}, {"format": 2, "recipe": "sst2", "stages": {}},
                    {"package": [{"name": "click"}]}, None):
        assert not is_optforge_lock(foreign, "sst2")


def test_an_entry_copied_out_of_the_cache_is_still_verified(cache, tmp_path):
    import shutil

    from optforge.cache import verify_entry

    seal(cache, K1)
    copy = tmp_path / "exported"
    shutil.copytree(cache.entry_dir(K1), copy)
    assert verify_entry(copy)["key"] == K1
    (copy / "model.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(CacheError, match="model.safetensors sha256 mismatch"):
        verify_entry(copy)
