"""Shared fixtures, kept to four: an isolated optforge environment, a CLI runner in a subprocess, the
fake (pure-Python) stage kinds installed in-process, and recipes/tiny.yaml built once per session with
the real stages (for the end-to-end and export tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from optforge_testing import TESTS, build_tiny, shared_data_root



@pytest.fixture
def optforge_env(tmp_path, monkeypatch):
    """cwd = a tmp dir; OPTFORGE_CACHE inside it; OPTFORGE_DATA_ROOT = the shared SST-2 data."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OPTFORGE_CACHE", str(cache))
    monkeypatch.setenv("OPTFORGE_DATA_ROOT", str(shared_data_root()))
    monkeypatch.chdir(tmp_path)
    return SimpleNamespace(root=tmp_path, cache=cache, data=shared_data_root())


@pytest.fixture
def cli(optforge_env):
    """run(*args, fake=True, env=None, modules_out=None) -> CompletedProcess: `optforge ARGS` in a
    subprocess (fake stages unless fake=False), via tests/cli_wrapper.py."""

    def run(*args, fake: bool = True, env: dict | None = None, modules_out: Path | None = None,
            timeout: float = 300, **popen):
        full_env = dict(os.environ, OPTFORGE_TEST_FAKE_STAGES="1" if fake else "0", **(env or {}))
        if modules_out is not None:
            full_env["OPTFORGE_TEST_MODULES_OUT"] = str(modules_out)
        cmd = [sys.executable, str(TESTS / "cli_wrapper.py"), *map(str, args)]
        if popen.pop("background", False):
            return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, **popen)
        return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, **popen)

    return run


@pytest.fixture
def fake_kinds():
    """Every stage kind replaced by tests/fake_stages.py's fakes for the duration of a test."""
    import fake_stages

    previous = fake_stages.install()
    yield fake_stages
    fake_stages.restore(previous)


@pytest.fixture(scope="session")
def built_tiny(tmp_path_factory):
    """recipes/tiny.yaml built on CPU with the real stages, once per session (optforge_testing.build_tiny);
    tests work on copies of it (optforge_testing.copy_built)."""
    return build_tiny(tmp_path_factory.mktemp("tiny-base"))
