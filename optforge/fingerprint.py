"""What goes into a stage key besides its parameters and the device (optforge/device.py): canonical
JSON and its hash, file hashes, library versions; and the JSON files the engine keeps them in. No torch
import anywhere here: versions come from package metadata, so `plan` and a no-op `build` stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

LIBRARIES = ("torch", "transformers", "torchao")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj, indent: int | None = None) -> None:
    """Temp file + rename: a reader (or a SIGKILL) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, sort_keys=True, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a failed write leaves nothing behind
        raise


def read_json(path: Path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class FileHashes:
    """sha256 of files, memoised by (absolute path, size, mtime_ns) in `<cache>/fingerprints.json`.

    Used for data files (every plan) and for re-checking artifact files whose mtime moved. The memo is
    only a speed-up: losing it (or a concurrent writer winning the rename) costs a re-hash, nothing else.
    """

    def __init__(self, memo_path: Path | None):
        self.memo_path = memo_path
        self.memo: dict = (read_json(memo_path, {}) if memo_path else {}) or {}
        self.dirty = False

    def sha256(self, path: Path | str) -> str:
        p = Path(path).absolute()
        st = p.stat()
        hit = self.memo.get(str(p))
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        digest = file_sha256(p)
        self.memo[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty and self.memo_path is not None:
            # drop entries of files that are gone, so the memo does not grow forever
            self.memo = {k: v for k, v in self.memo.items() if os.path.exists(k)}
            write_json_atomic(self.memo_path, self.memo)
            self.dirty = False


_VERSIONS: dict[str, str | None] | None = None


def library_versions(libraries: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions from package metadata (importing torch would cost seconds), memoised; None for a
    library that is not installed."""
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = {}
    missing = [lib for lib in libraries if lib not in _VERSIONS]
    if missing:
        from importlib import metadata

        for lib in missing:
            try:
                _VERSIONS[lib] = metadata.version(lib)
            except metadata.PackageNotFoundError:
                _VERSIONS[lib] = None
    return {lib: _VERSIONS[lib] for lib in libraries}
