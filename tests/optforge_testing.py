"""Paths shared by the engine tests. A module of its own (not conftest): with several conftest.py files
in the tree, `from conftest import ...` would pick whichever was imported last."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def shared_data_root() -> Path:
    """The SST-2 TSVs live outside the repo (never committed): ../shared/data from the repo root."""
    return Path(os.environ.get("OPTFORGE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()
