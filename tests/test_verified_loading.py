"""Loading an artifact to use it verifies its cache entry first (issue 12): a file damaged with its size
and mtime kept (bit rot, `cp -p`) passes plan's cheap check but is never served."""

from __future__ import annotations

import os
import shutil

import pytest

from optforge.cache import Cache
from optforge.errors import CacheError
from optforge.fingerprint import sha256_json

TEXTS = ["a gripping , funny film", "dull"]


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """A tiny float classifier sealed into a cache as the teacher stage would leave it: (cache, key)."""
    from stages.tiny_models import save_tiny

    cache = Cache(tmp_path_factory.mktemp("cache"))
    tmp = save_tiny(cache.new_tmp(), seed=7, max_length=16)
    key = sha256_json("teacher")
    cache.commit(tmp, key, status="ok", metrics={}, reason=None, kind="teacher", stage="teacher")
    return cache, key


@pytest.fixture
def damaged(sealed, tmp_path):
    """A copy of the sealed cache whose weights were overwritten, size and mtime kept: (cache, key)."""
    cache, key = sealed
    copy = Cache(tmp_path / "cache")
    shutil.copytree(cache.root, copy.root)
    weights = copy.entry_dir(key) / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # the last weights (the head) zeroed: the model still loads and answers
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    return copy, key


def test_plan_trusts_size_and_mtime_but_serving_verifies_sha256(damaged):
    from optforge.serve.model import load_for_serving

    cache, key = damaged
    assert cache.state(key).status == "ok"  # plan stays cheap (README: what is verified when)
    with pytest.raises(CacheError, match=r"model\.safetensors sha256 mismatch.*--force teacher"):
        load_for_serving(cache.entry_dir(key), "cpu")


def test_load_runnable_verifies_unless_the_engine_already_did(damaged, sealed):
    from optforge.artifacts import load_runnable

    cache, key = damaged
    with pytest.raises(CacheError, match=r"model\.safetensors sha256 mismatch"):
        load_runnable(cache.entry_dir(key), "cpu")
    # a stage whose inputs the engine hashed before it ran does not hash them again
    assert len(load_runnable(cache.entry_dir(key), "cpu", verify=False).predict(TEXTS)) == 2
    good, key = sealed
    assert len(load_runnable(good.entry_dir(key), "cpu").predict(TEXTS)) == 2


def test_an_entry_without_its_manifest_is_not_loaded(sealed, tmp_path):
    from optforge.artifacts import load_runnable

    cache, key = sealed
    copy = Cache(tmp_path / "cache")
    shutil.copytree(cache.root, copy.root)
    (copy.entry_dir(key) / "manifest.json").unlink()
    with pytest.raises(CacheError, match="no valid manifest.json"):
        load_runnable(copy.entry_dir(key), "cpu")
