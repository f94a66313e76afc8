"""Where a model reference points, without importing torch or transformers.

References: "pkg:<python package>/<subdir>" (a model shipped in an installed package), "hf:<org/name>"
(the Hugging Face hub or its local cache), or a local folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from optforge.errors import OptforgeError

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
