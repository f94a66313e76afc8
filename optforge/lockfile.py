"""The recipe's lock file beside the recipe (DVC's dvc.lock): the resolved state of its last build on
one device. Per stage: kind, code version, key, params (defaults filled in), input keys and the stages
they came from, data file hashes, library versions, device (hardware-bound kinds only), `error` when
the stage crashed, and `digest` for an entry that holds code (see optforge.cache.entry_digest). JSON
with sorted keys and no timestamps, so it diffs cleanly in git and `plan` can say *what* changed since.

Names (`lock_path`): `sst2.yaml` -> `sst2.lock` / `sst2.cuda.lock` (a `.yaml` file whose stem has no
dot: the names optforge always used); any other recipe file keeps its whole name, `tiny.yml` ->
`tiny.yml.lock` / `tiny.yml.cuda.lock`, `x.cuda.yaml` -> `x.cuda.yaml.lock`, so `tiny.yaml` and
`tiny.yml`, or `x.yaml`'s CUDA lock and `x.cuda.yaml`, never share one. The two schemes cannot meet
but for odd file names (`x` beside `x.yaml`); such a pair is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from optforge.errors import CacheError
from optforge.fingerprint import read_json, write_json_atomic
from optforge.recipe import DEVICES

LOCK_FORMAT = 1


def _short_name(file_name: str) -> bool:
    """Recipes whose lock drops the suffix: `<stem>.yaml` with a stem free of dots."""
    stem = file_name[: -len(".yaml")]
    return file_name.endswith(".yaml") and bool(stem) and "." not in stem


def lock_name(file_name: str, device: str = "cpu") -> str:
    base = file_name[: -len(".yaml")] if _short_name(file_name) else file_name
    return f"{base}.lock" if device == "cpu" else f"{base}.{device}.lock"


def _recipes_named(lock: str) -> set[str]:
    """Every recipe file name whose lock file (on some device) is named `lock`: lock_name inverted."""
    base = lock[: -len(".lock")]
    names = set()
    for device in DEVICES:
        suffix = "" if device == "cpu" else f".{device}"
        if base.endswith(suffix) and base != suffix:
            stem = base[: len(base) - len(suffix)]
            names |= {n for n in (stem, f"{stem}.yaml") if lock_name(n, device) == lock}
    return names


def lock_path(recipe_path: Path, device: str = "cpu") -> Path:
    """The lock file of `recipe_path`'s builds on `device` (names: see the module docstring). Raises
    CacheError when another file beside it would use the same lock file."""
    recipe_path = Path(recipe_path)
    path = recipe_path.with_name(lock_name(recipe_path.name, device))
    for other in sorted(_recipes_named(path.name) - {recipe_path.name}):
        if (recipe_path.parent / other).is_file():
            raise CacheError(f"{recipe_path.parent / other} and {recipe_path} would share the lock file {path}; "
                             "rename one of them")
    return path


def read_lock(path: Path) -> Optional[dict]:
    """The lock file's content, or None when it is absent or unreadable (then every stage is "new")."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return None
    return data


def is_optforge_lock(data, recipe_name: Optional[str] = None) -> bool:
    """Whether `data` (a parsed file) is a lock file optforge wrote (for `recipe_name`, when given)."""
    return (isinstance(data, dict) and data.get("format") == LOCK_FORMAT and isinstance(data.get("recipe"), str)
            and isinstance(data.get("stages"), dict) and recipe_name in (None, data["recipe"]))


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
