"""Where a model reference points, and what its config says, without importing torch or transformers (so
`validate` can check a recipe against its teacher before anything runs).

References: "pkg:<python package>/<subdir>" (a model shipped in an installed package), "hf:<org/name>"
(the Hugging Face hub or its local cache), or a local folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

from optforge import arch
from optforge.errors import OptforgeError

CONFIG_FILE = "config.json"
CONFIG_LIMIT = 1 << 20  # a model's config.json is a few KB; a larger one is not read at validate time
# the config keys that count an encoder's transformer layers (optforge.arch): most models, then DistilBERT
LAYER_COUNT_KEYS = tuple(dict.fromkeys(adapter.layer_count for adapter in arch.ADAPTERS.values()))


class ModelSourceError(OptforgeError):
    """A model/tokenizer reference that cannot be resolved or loaded."""


def resolve_source(ref: str) -> tuple[str, str]:
    """("path", folder) for pkg:/local references, ("hf", id) for hf: references."""
    if ref.startswith("pkg:"):
        spec = ref[4:]
        package, _, sub = spec.partition("/")
        if not package:
            raise ModelSourceError(f"bad model reference {ref!r}: expected pkg:<python package>/<subdir>")
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            dist = package.replace("_", "-")
            raise ModelSourceError(f"model reference {ref!r}: Python package {package!r} is not installed "
                                   f"(fix: pip install {dist})")
        folder = Path(list(found.submodule_search_locations)[0]) / sub
        if not folder.is_dir():
            raise ModelSourceError(f"model reference {ref!r}: package {package!r} has no folder {sub!r} "
                                   f"(looked in {folder})")
        return "path", str(folder)
    if ref.startswith("hf:"):
        if not ref[3:]:
            raise ModelSourceError(f"bad model reference {ref!r}: expected hf:<org/name>")
        return "hf", ref[3:]
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise ModelSourceError(f"model reference {ref!r}: no such folder (use pkg:<package>/<subdir>, "
                               f"hf:<org/name> or an existing directory)")
    return "path", str(folder)


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def cached_config(ref: str) -> Optional[dict]:
    """The config.json a reference points at, when it is on this machine (a pkg:/local folder, or an hf:
    id in the local cache at its `main` revision); None when it is not, or cannot be read as a mapping."""
    try:
        kind, where = resolve_source(ref)
    except ModelSourceError:
        return None  # the teacher stage says what is wrong with the reference
    if kind == "hf":
        repo = hf_cache_dir() / f"models--{where.replace('/', '--')}"
        try:
            revision = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not revision or "/" in revision or revision.startswith("."):
            return None
        path = repo / "snapshots" / revision / CONFIG_FILE
    else:
        path = Path(where) / CONFIG_FILE
    try:
        if not path.is_file() or path.stat().st_size > CONFIG_LIMIT:
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def layer_count(config: dict) -> Optional[int]:
    """How many transformer layers a model config declares, when it says so in a key we know (its family's,
    when optforge.arch knows the family)."""
    adapter = arch.find_adapter(config)
    for key in (adapter.layer_count,) if adapter is not None else LAYER_COUNT_KEYS:
        n = config.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None
