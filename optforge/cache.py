"""The content-addressed store. `$OPTFORGE_CACHE` or `./.optforge/`:

    objects/<key[:2]>/<key>/   artifact files + manifest.json (written last)
    tmp/<pid>-<random>/        outputs in progress; garbage once their pid is gone
    locks/<recipe>.lock        flock: one build of a recipe at a time (holds the builder's pid)
    locks/.builds              flock: shared by every running build, exclusive for `gc`
    locks/.registry            flock: around every write of recipes.json
    locks/.timings             flock: around every write of timings.json
    locks/keys/<key>.lock      flock: around running the stage of that key (holds the builder's pid)
    recipes.json               lock files of known recipes (what `gc` keeps alive)
    fingerprints.json          sha256 memo by path+size+mtime_ns (optforge.fingerprint.FileHashes)
    device.json                device probe, once per boot
    timings.json               how long each stage took, per machine (optforge.timings: what `plan` expects)

Trust rule: an entry is trusted only through its manifest, which is written and fsynced after every
artifact file and before the atomic rename into objects/. A SIGKILL at any moment leaves either a
complete entry or a tmp dir nobody reads. Directories are named by keys, never by user strings.

Verification policy (keeps a no-op build fast while never loading a damaged file):
  * every plan: manifest present, and each file's size and mtime_ns as recorded; a file whose mtime
    moved is re-hashed (through the memo) and compared with the manifest's sha256.
  * before a running stage consumes an upstream entry: every file's sha256, and no file the manifest
    does not list (`deep=True`).
  * before anything else loads an entry to use it (serve, export: `optforge.artifacts.load_runnable`):
    the same, through `verify_entry`, which raises a CacheError naming the damaged file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from optforge.cache_entry import EntryState
from optforge.errors import CacheError
from optforge.fingerprint import FileHashes, file_sha256, read_json, sha256_json, write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_KEY = re.compile(r"^[0-9a-f]{64}$")
_LOCK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_root() -> Path:
    return Path(os.environ.get("OPTFORGE_CACHE") or ".optforge")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unwritable(directory: Path, error: OSError) -> CacheError:
    """The one message for a cache directory that cannot be written (names the nearest existing one)."""
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    return CacheError(f"cannot write into the cache directory {directory} ({error.strerror or error}): make it "
                      f"writable (chmod -R u+w {directory}) or set OPTFORGE_CACHE to a writable directory")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sealed_manifest(m, key: str) -> bool:
    return isinstance(m, dict) and m.get("key") == key and m.get("status") in ("ok", "failed") \
        and isinstance(m.get("files", {}), dict)


def entry_digest(manifest: dict) -> str:
    """What an entry says, in one sha256: status, reason, metrics and every file's sha256 (no sizes or
    mtimes, which a copy changes). Kept outside the cache (in the lock file) for entries that hold code,
    it tells a consistently rewritten entry (files and manifest) from the one that was built."""
    return sha256_json({"status": manifest["status"], "reason": manifest.get("reason"),
                        "metrics": manifest.get("metrics") or {},
                        "files": {rel: info["sha256"] for rel, info in manifest.get("files", {}).items()}})


def check_files(base: Path, files: dict, deep: bool, sha256: Callable[[Path], str] = file_sha256) -> Optional[str]:
    """The first way the files under `base` differ from a manifest's `files`, or None. Cheap: size, and
    the sha256 (through `sha256`, e.g. the memo) of a file whose mtime moved. Deep: every file's sha256,
    and no symlink and no file the manifest does not list."""
    for rel, info in sorted(files.items()):
        path = base / rel
        try:
            st = path.lstat() if deep else path.stat()
        except OSError:
            return f"{rel} missing"
        if deep and not stat.S_ISREG(st.st_mode):
            return f"{rel} is not a regular file"
        if st.st_size != info["size"]:
            return f"{rel} size mismatch ({st.st_size} bytes, expected {info['size']})"
        if deep or st.st_mtime_ns != info.get("mtime_ns"):
            digest = file_sha256(path) if deep else sha256(path)
            if digest != info["sha256"]:
                return f"{rel} sha256 mismatch"
    if deep:
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base).as_posix()
            if rel not in files and rel != MANIFEST and (path.is_symlink() or not path.is_dir()):
                return f"{rel} is not in its manifest"
    return None


def is_entry_dir(path: Path) -> bool:
    """Whether `path` is a cache entry, or is placed like one (objects/<key[:2]>/<key>/, its manifest gone)."""
    path = Path(path)
    return (path / MANIFEST).exists() or (bool(_KEY.match(path.name)) and path.parent.name == path.name[:2]
                                          and path.parent.parent.name == "objects")


def verify_entry(entry_dir: Path) -> dict:
    """Every file of a sealed entry against its manifest (sha256, no extra file): its manifest, or a
    CacheError naming what is damaged. What a loader calls before it uses an artifact."""
    base = Path(entry_dir)
    m = read_json(base / MANIFEST)
    key = base.name if _KEY.match(base.name) else (m or {}).get("key")  # an entry copied elsewhere keeps its key
    if not _sealed_manifest(m, key) or m["status"] != "ok":
        raise CacheError(f"{base}: no valid {MANIFEST}: not a sealed cache entry, so it was not loaded; "
                         "rebuild it (optforge build RECIPE)")
    problem = check_files(base, m.get("files", {}), deep=True)
    if problem:
        stage = m.get("stage") or "STAGE"
        raise CacheError(f"{base}: {problem}: this cache entry (made by stage {stage!r}) is damaged and was not "
                         f"loaded; rebuild it with `optforge build RECIPE --force {stage}`")
    return m


class Cache:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.hashes = FileHashes(self.root / "fingerprints.json")

    # ------------------------------------------------------------------ entries

    def entry_dir(self, key: str) -> Path:
        if not _KEY.match(key):
            raise CacheError(f"not a stage key: {key!r}")
        return self.objects / key[:2] / key

    def manifest(self, key: str) -> Optional[dict]:
        m = read_json(self.entry_dir(key) / MANIFEST)
        return m if _sealed_manifest(m, key) else None

    def state(self, key: str, deep: bool = False) -> EntryState:
        """How far an entry can be trusted (see the module docstring for what `deep` adds)."""
        m = self.manifest(key)
        if m is None:
            return EntryState("missing")
        if m["status"] == "failed":
            return EntryState("failed", m.get("reason") or "failed", m.get("metrics") or {}, entry_digest(m))
        # cheap: the memo spares re-hashing a file that was only touched
        problem = check_files(self.entry_dir(key), m.get("files", {}), deep, self.hashes.sha256)
        if problem:
            return EntryState("corrupted", problem, digest=entry_digest(m))
        return EntryState("ok", None, m.get("metrics") or {}, entry_digest(m))

    def new_tmp(self) -> Path:
        path = self.tmp / f"{os.getpid()}-{secrets.token_hex(6)}"
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise _unwritable(self.tmp, e) from None
        return path

    def check_writable(self, key: str) -> None:
        """Before a stage runs: could its output be sealed under `key`? (Else its work would be lost.)"""
        for directory in (self.tmp, self.entry_dir(key).parent):
            try:
                directory.mkdir(parents=True, exist_ok=True)
                # named like a tmp dir of a live process, so that another build's sweep_tmp leaves it
                probe = directory / f"{os.getpid()}-probe-{secrets.token_hex(4)}"
                probe.mkdir()
                probe.rmdir()
            except OSError as e:
                raise _unwritable(directory, e) from None

    def commit(self, tmp: Path, key: str, *, status: str, metrics: dict, reason: Optional[str],
               kind: str, stage: str, replace: bool = False) -> EntryState:
        """Seal `tmp` as the entry for `key`: manifest last, fsync, atomic rename. When the entry
        already exists (another build got there first) ours is discarded, unless `replace`."""
        files = {}
        if status == "ok":
            for p in sorted(tmp.rglob("*")):
                if p.is_symlink():
                    raise CacheError(f"stage {stage!r} wrote a symlink ({p.relative_to(tmp)}); "
                                     "artifacts must be self-contained files")
                if p.is_file() and p.relative_to(tmp).as_posix() != MANIFEST:
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
                    st = p.stat()
                    files[p.relative_to(tmp).as_posix()] = {
                        "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(p)}
        else:  # a failed stage leaves no artifact, only its reason
            shutil.rmtree(tmp)
            tmp.mkdir()
        manifest = {"format": MANIFEST_FORMAT, "key": key, "kind": kind, "stage": stage, "status": status,
                    "reason": reason, "metrics": metrics, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, sort_keys=True, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)

        target = self.entry_dir(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if replace or self.state(key).status not in ("ok", "failed"):
                    self.evict(key)
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self.state(key)
            os.rename(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise _unwritable(target.parent, e) from None
            # else a concurrent build sealed the same key first
        fsync_dir(target.parent)
        return self.state(key)

    def evict(self, key: str) -> None:
        """Remove an entry: rename it out of objects/ first, so nobody sees it half-deleted."""
        target = self.entry_dir(key)
        if not target.exists():
            return
        self.tmp.mkdir(parents=True, exist_ok=True)
        trash = self.tmp / f"{os.getpid()}-evict-{secrets.token_hex(6)}"
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def keys(self) -> Iterator[str]:
        if not self.objects.is_dir():
            return
        for shard in sorted(self.objects.iterdir()):
            if shard.is_dir():
                for entry in sorted(shard.iterdir()):
                    if _KEY.match(entry.name):
                        yield entry.name

    def sweep_tmp(self) -> list[Path]:
        """Delete tmp dirs left by dead processes (killed builds)."""
        removed = []
        if self.tmp.is_dir():
            for d in self.tmp.iterdir():
                pid = d.name.split("-", 1)[0]
                if not pid.isdigit() or not pid_alive(int(pid)):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
        return removed

    # ------------------------------------------------------------------ locks

    @contextlib.contextmanager
    def _pid_lock(self, path: Path, on_busy: Callable[[str], None]):
        """flock `path` exclusively, with our pid written in it. When another process holds it,
        `on_busy(its pid)` is called first (raise to give up), then we wait for it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                on_busy(f.read().strip() or "?")
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def recipe_lock(self, name: str, wait: bool = False):
        """One build of a recipe at a time. Fails at once, naming the holder's pid, unless `wait`."""
        if not _LOCK_NAME.match(name):
            raise CacheError(f"recipe name {name!r} cannot name a lock file")

        def busy(pid: str) -> None:
            if not wait:
                raise CacheError(f"another build of {name!r} is running (pid {pid}); "
                                 "wait for it to finish or pass --wait")

        return self._pid_lock(self.locks / f"{name}.lock", busy)

    def key_lock(self, key: str, on_wait: Callable[[str], None] = lambda pid: None):
        """Held around running the stage whose output is `key`: a second build (another recipe with an
        equal stage) waits for the first's entry instead of doing the same work; `on_wait(pid)` first."""
        self.entry_dir(key)  # a key, or CacheError
        return self._pid_lock(self.locks / "keys" / f"{key}.lock", on_wait)

    @contextlib.contextmanager
    def exclusive(self, lockname: str):
        """flock `locks/<lockname>` exclusively: around a read-modify-write of a file shared by builds
        (`.registry`: recipes.json; `.timings`: timings.json)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with open(self.locks / lockname, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ registry of recipe lock files

    def registered(self) -> list[str]:
        return sorted((read_json(self.root / "recipes.json", {}) or {}).get("lockfiles", []))

    def register(self, lockfile: Path) -> None:
        path = str(Path(lockfile).absolute())
        if path in self.registered():  # the common case, and a no-op build must not write
            return
        with self.exclusive(".registry"):  # read-modify-write across concurrent builds
            known = set(self.registered()) | {path}
            write_json_atomic(self.root / "recipes.json", {"lockfiles": sorted(known)}, indent=1)

    def unregister(self, lockfile: Path) -> bool:
        path = str(Path(lockfile).absolute())
        with self.exclusive(".registry"):
            known = self.registered()
            if path not in known:
                return False
            known.remove(path)
            write_json_atomic(self.root / "recipes.json", {"lockfiles": known}, indent=1)
            return True

    # ------------------------------------------------------------------ gc

    @contextlib.contextmanager
    def build_lock(self):
        """Held, shared, by every build from before it registers its lock file until it ends, so that a
        gc (which takes it exclusively) never runs beside a build, a first build included: such a build
        may hold entries that no lock file refers to yet. Waits while a gc runs (seconds)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with open(self.locks / ".builds", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _no_build_running(self):
        """gc's side of `build_lock` (and of every recipe lock, which `clean` takes too)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        held, busy = [], False
        with contextlib.ExitStack() as stack:
            for lock in [self.locks / ".builds", *sorted(self.locks.glob("*.lock"))]:
                f = stack.enter_context(open(lock, "a+"))
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    busy = True
                    if lock.suffix == ".lock":
                        held.append(lock.stem)
            if busy:
                names = f" ({', '.join(held)})" if held else ""
                raise CacheError(f"a build is running{names}; run gc when it has finished")
            yield

    def gc(self, dry_run: bool = False, forget=(), forget_missing: bool = False) -> "GcResult":
        """Remove entries no registered lock file refers to. A gc never removes what it cannot prove
        unreferenced: it refuses while a build runs, and while any registered lock file is missing (a
        moved project) or unreadable (a merge conflict), unless that file is forgotten first: `forget`
        (paths), `forget_missing` (every missing one). Nothing is forgotten by a dry run."""
        from optforge.lockfile import is_optforge_lock

        with self._no_build_running(), self.exclusive(".registry"):
            registered = self.registered()
            forgotten = sorted({str(Path(p).absolute()) for p in forget})
            unknown = [p for p in forgotten if p not in registered]
            if unknown:
                raise CacheError(f"{unknown[0]} is not a registered lock file (registered: "
                                 f"{', '.join(registered) or 'none'})")
            if forget_missing:
                forgotten = sorted(set(forgotten) | {p for p in registered if not os.path.exists(p)})
            keep: set[str] = set()
            problems = []
            for lockfile in [p for p in registered if p not in forgotten]:
                lock = read_json(Path(lockfile))  # None when missing or not JSON
                if not os.path.exists(lockfile):
                    problems.append(f"registered lock file {lockfile} is missing (a moved or deleted project?): "
                                    f"restore it, or forget it with `optforge gc --forget {lockfile}` "
                                    "(`--forget-missing` forgets every missing one)")
                elif not is_optforge_lock(lock):
                    problems.append(f"registered lock file {lockfile} is not an optforge lock file (an unresolved "
                                    f"merge conflict?): fix it, or forget it with `optforge gc --forget {lockfile}`")
                else:
                    keep |= {s["key"] for s in lock["stages"].values() if isinstance(s, dict) and "key" in s}
            if problems:
                raise CacheError("; ".join(problems) + "; gc removed nothing")
            removed = [k for k in self.keys() if k not in keep]
            if not dry_run:
                if forgotten:
                    write_json_atomic(self.root / "recipes.json",
                                      {"lockfiles": [p for p in registered if p not in forgotten]}, indent=1)
                for k in removed:
                    self.evict(k)
                self.sweep_tmp()
                shutil.rmtree(self.locks / "keys", ignore_errors=True)  # no build runs: nobody holds one
            return GcResult(removed, sorted(keep & set(self.keys())), forgotten)


@dataclass
class GcResult:
    removed: list[str]  # keys
    kept: list[str]  # keys
    forgotten: list[str]  # lock files taken out of the registry
