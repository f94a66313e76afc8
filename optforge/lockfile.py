"""The recipe's lock file, `<recipe stem>.lock` beside the recipe (DVC's dvc.lock; `<stem>.cuda.lock`
for CUDA builds): the resolved state of its last build on that device. Per stage: kind, code version,
key, params (defaults filled in), input keys and the stages they came from, data file hashes, library
versions, device (hardware-bound kinds only), and `error` when the stage crashed. JSON with sorted
keys and no timestamps, so it diffs cleanly in git and `plan` can say *what* changed since.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from optforge.fingerprint import read_json, write_json_atomic

LOCK_FORMAT = 1


def lock_path(recipe_path: Path, device: str = "cpu") -> Path:
    """`<stem>.lock` for CPU builds, `<stem>.<device>.lock` (`<stem>.cuda.lock`) for the others: a
    recipe built on both devices keeps both states."""
    return Path(recipe_path).with_suffix(".lock" if device == "cpu" else f".{device}.lock")


def read_lock(path: Path) -> Optional[dict]:
    """The lock file's content, or None when it is absent or unreadable (then every stage is "new")."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return None
    return data


def render_lock(recipe_name: str, stages: dict) -> str:
    return json.dumps({"format": LOCK_FORMAT, "recipe": recipe_name, "stages": stages},
                      sort_keys=True, indent=2) + "\n"


def write_lock(path: Path, recipe_name: str, stages: dict) -> bool:
    """Write atomically, and only when the content changes (a no-op build writes nothing)."""
    text = render_lock(recipe_name, stages)
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    write_json_atomic(path, json.loads(text), indent=2)
    return True
