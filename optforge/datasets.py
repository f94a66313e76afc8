"""Where a recipe's dataset folder lives. Pure (paths only): the graph names data files with it, the
data stage reads them through it."""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("OPTFORGE_DATA_ROOT", "data"))


def resolve_dataset_dir(dataset: str, recipe_dir: Path | None = None) -> Path:
    """Where a dataset folder lives: a path as written if it exists (relative to the recipe's folder
    first), else a folder under the data root."""
    p = Path(dataset).expanduser()
    candidates = [p] if p.is_absolute() else [(recipe_dir or Path(".")) / p, Path(p), data_root() / p]
    for c in candidates:
        if c.is_dir():
            return c
    return data_root() / p
