"""Where an export is written, and how it appears: whole or not at all.

An export is written into a staging directory beside the destination (`.<name>.export-<pid>-<random>`,
same filesystem), and renamed into place only once it is complete and its round trip has passed. A
rename onto a missing or empty directory is atomic; a non-empty destination is refused unless `force`,
and then only when it is a previous export (it has optforge's MANIFEST): it is renamed aside
(`.<name>.old-<pid>-<random>`), the new one renamed in, and the old one deleted. An interrupted export
leaves at most a dot-directory beside the destination, which the next export of that destination
removes once its process is gone. Pure: no torch.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from optforge.cache import fsync_dir, pid_alive
from optforge.export import ExportError
from optforge.export.card import MANIFEST, MANIFEST_HEADER


def is_export(path: Path) -> bool:
    """Whether `path` is a directory an optforge export wrote (its MANIFEST starts with our header)."""
    try:
        with open(Path(path) / MANIFEST, encoding="utf-8") as f:
            return f.readline() == MANIFEST_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def check_destination(out: Path, force: bool) -> None:
    """ExportError when `out` cannot receive an export (checked before the work and again before the rename)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out} exists and is {'a symlink' if out.is_symlink() else 'not a directory'}; "
                          "choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out} is not empty; pass --force to replace it (a previous export), "
                              "or choose another --out")
        if not is_export(out):
            raise ExportError(f"--out {out} is not empty and is not an optforge export (no optforge {MANIFEST}): "
                              "--force replaces only a previous export; remove it yourself or choose another --out")


def _named(parent: Path, name: str, what: str) -> list[tuple[Path, int]]:
    """(path, pid) of the `.<name>.<what>-<pid>-<random>` directories in `parent`."""
    prefix = f".{name}.{what}-"
    out = []
    for p in parent.glob(f".{name}.{what}-*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and p.is_dir() and not p.is_symlink():
            out.append((p, int(pid)))
    return out


def sweep(out: Path) -> list[Path]:
    """Remove what interrupted exports of `out` left beside it: staging directories of dead processes, and
    the old export a dead `--force` had renamed aside (only once `out` exists again: until then it is the
    only copy, left for the user)."""
    out = Path(out)
    removed = []
    stale = [p for p, pid in _named(out.parent, out.name, "export") if not pid_alive(pid)]
    if out.is_dir():
        stale += [p for p, pid in _named(out.parent, out.name, "old") if not pid_alive(pid)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def staging_dir(out: Path) -> Path:
    """A new, empty staging directory beside `out` (its parent is created when missing)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep(out)
        path = out.parent / f".{out.name}.export-{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir()
    except OSError as e:
        raise ExportError(f"cannot write beside --out {out} ({e.strerror or e}): choose a writable place") from None
    return path


def publish(staged: Path, out: Path, force: bool) -> None:
    """Rename the complete export `staged` into place at `out` (see the module docstring)."""
    out = Path(out)
    check_destination(out, force)
    old = None
    if out.is_dir() and any(out.iterdir()):  # a previous export, and force (check_destination)
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(staged, out)  # onto nothing or an empty directory: atomic; onto a non-empty one: refused
    except OSError as e:
        if old is not None:
            os.rename(old, out)
        raise ExportError(f"cannot move the export into --out {out} ({e.strerror or e}); nothing was changed "
                          "there") from None
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
