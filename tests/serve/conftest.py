"""Fixtures for the serving tests: a tiny random-init classifier artifact (2 layers, hidden 32) and its
Runnable. Functional tests only: its predictions are random, its speed means nothing."""

from __future__ import annotations

import pytest

@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    from optforge_testing import save_random_classifier

    return save_random_classifier(tmp_path_factory.mktemp("serve-artifact"), seed=5, max_length=32)[0]


@pytest.fixture(scope="session")
def tiny_runnable(tiny_artifact):
    from optforge.artifacts import load_runnable

    return load_runnable(tiny_artifact, "cpu")
