"""The remote cache: a content-addressed store that the local caches of several machines share, on any
fsspec filesystem (`s3://`, `gs://`, `file://`, `ssh://`). Layout under the remote URL:

    blobs/<sha[:2]>/<sha256>        a file's bytes, named by their sha256 (shared by every entry that has them)
    entries/<key[:2]>/<key>.json    an entry's manifest: kind, status, reason, metrics, device, and
                                    files: {relative path: {size, sha256}}
    tmp/<host>-<pid>-<random>       staging, only on stores whose writes are not atomic (file://, ssh://);
                                    what a killed writer leaves here is garbage, safe to delete

Trust rule, the local cache's carried over: an entry exists only through its manifest, which is
published after every blob it names, and put-if-absent (S3 `If-None-Match: *`, a hard link on a local
filesystem): the first complete publication of a key is the one every machine reads, and two machines
publishing the same key at once leave one whole entry. A push killed at any moment leaves blobs that no
manifest names, never a manifest naming a blob that is not all there. A reader trusts nothing it has not
checked: the manifest must be well formed, name its own key and only plain relative paths, and every
file must have the size and sha256 the manifest gives as it is downloaded; otherwise the entry is
ignored with a warning, the stage runs locally, and a pusher that has the right bytes repairs it.

Credentials are the backend's (fsspec, botocore: AWS_* variables, ~/.aws; gcloud's; ~/.ssh): URLs carry
none, and every message names the remote through `remote_url.redact`. fsspec is imported only when a
remote is first used, so a build without one (or a no-op build with one) never loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Optional

from optforge.errors import RemoteError, one_line
from optforge.remote_url import ATOMIC_PUT, check_remote, redact

REMOTE_FORMAT = 1
MAX_MANIFEST_BYTES = 16 << 20  # a manifest larger than this is not one of ours
_CHUNK = 1 << 20
SMALL_BLOB = 256 << 10  # uploaded without asking whether the remote has it
_SHA = re.compile(r"^[0-9a-f]{64}$")
_URLS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
# what the backend package of a protocol is called, for the "install it" message
_PACKAGES = {"s3": "s3fs (pip install 'optforge[s3]')", "s3a": "s3fs (pip install 'optforge[s3]')",
             "gs": "gcsfs", "gcs": "gcsfs", "ssh": "paramiko", "sftp": "paramiko", "az": "adlfs", "abfs": "adlfs"}


# --------------------------------------------------------------------------- manifests (pure)


def remote_manifest(manifest: dict, device: Optional[dict]) -> dict:
    """What is published for a sealed local entry: its manifest less what only this machine's copy has
    (file mtimes), plus the device fingerprint of a hardware-bound stage (None otherwise). That fingerprint
    is already part of the key; carried in the manifest as well, a reader checks it before trusting the entry."""
    return {"format": REMOTE_FORMAT, "key": manifest["key"], "kind": manifest["kind"], "stage": manifest.get("stage"),
            "status": manifest["status"], "reason": manifest.get("reason"), "metrics": manifest.get("metrics") or {},
            "device": device,
            "files": {rel: {"size": info["size"], "sha256": info["sha256"]}
                      for rel, info in sorted(manifest.get("files", {}).items())}}


def safe_relative(rel) -> bool:
    """A path a manifest may name: relative, '/'-separated, no empty, '.' or '..' part, no backslash or
    control character, and not the manifest itself."""
    if not isinstance(rel, str) or not rel or len(rel) > 1024 or rel.startswith("/") or "\\" in rel:
        return False
    if any(ord(c) < 32 for c in rel) or rel == "manifest.json":
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def manifest_problem(m, key: str) -> Optional[str]:
    """Why `m` (parsed JSON) is not a usable manifest of `key`, or None. Pure: no file is looked at."""
    if not isinstance(m, dict):
        return "manifest is not a JSON object"
    if m.get("format") != REMOTE_FORMAT:
        return f"manifest format {shown_value(m.get('format'))} (this optforge reads {REMOTE_FORMAT})"
    if m.get("key") != key:
        return "manifest names another key"
    if not isinstance(m.get("kind"), str) or m.get("status") not in ("ok", "failed"):
        return "manifest has no valid kind or status"
    if not isinstance(m.get("metrics"), dict) or not isinstance(m.get("files"), dict):
        return "manifest has no metrics or files mapping"
    if m["status"] == "failed" and (m["files"] or not isinstance(m.get("reason"), str)):
        return "a failed entry's manifest must have a reason and no files"
    for rel, info in m["files"].items():
        if not safe_relative(rel):
            return f"manifest names an unsafe path {shown_value(rel)}"
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and not isinstance(info["size"], bool)
                and info["size"] >= 0 and isinstance(info.get("sha256"), str) and _SHA.match(info["sha256"])):
            return f"manifest entry of {rel} has no valid size and sha256"
    paths = set(m["files"])
    for rel in paths:  # a file and a directory of the same name cannot both be written
        parts = rel.split("/")
        if any("/".join(parts[:i]) in paths for i in range(1, len(parts))):
            return f"manifest names {rel} under a file"
    return None


def shown_value(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def scrub(text: str) -> str:
    """A backend's error text with every URL in it redacted (no userinfo, no query string)."""
    return _URLS.sub(lambda m: redact(m.group(0)), text)


# --------------------------------------------------------------------------- the store


class Remote:
    """One remote cache, its URL opened through fsspec on first use. Transport failures raise RemoteError
    (one line); a missing entry is None; a damaged one is a problem string, never an exception."""

    def __init__(self, url: str):
        try:
            self.url = check_remote(url)
        except ValueError as e:
            raise RemoteError(f"remote cache: {e}") from None
        self.protocol = self.url.split("://", 1)[0]
        self._fs, self._root = None, ""
        self.damaged_blobs: set[str] = set()  # sha256s whose remote bytes failed verification here
        self.damaged_entries: set[str] = set()  # keys whose remote entry failed verification here

    def __repr__(self) -> str:
        return f"Remote({self.shown!r})"

    @property
    def shown(self) -> str:
        return redact(self.url)

    # ------------------------------------------------------------------ plumbing

    @property
    def fs(self):
        if self._fs is None:
            with self._errors("open"):
                import fsspec

                self._fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
                self._root = root.rstrip("/")
        return self._fs

    @property
    def atomic_put(self) -> bool:
        return self.protocol in ATOMIC_PUT

    def _path(self, *parts: str) -> str:
        self.fs  # noqa: B018 -- sets the root
        return "/".join([self._root, *parts])

    def entry_path(self, key: str) -> str:
        return self._path("entries", key[:2], f"{key}.json")

    def blob_path(self, sha: str) -> str:
        return self._path("blobs", sha[:2], sha)

    @contextlib.contextmanager
    def _errors(self, what: str):
        """Any backend failure -> one RemoteError line naming the remote and the fix. (A read that expects
        to find nothing catches FileNotFoundError inside the block; here it means a write found no place
        to go: a bucket or directory that is not there.)"""
        try:
            yield
        except RemoteError:
            raise
        except FileNotFoundError as e:
            raise RemoteError(f"remote cache {self.shown}: {what} failed: {scrub(one_line(e))}: does the "
                              "bucket or directory exist?") from None
        except ImportError as e:
            package = _PACKAGES.get(self.protocol, "the fsspec backend of this protocol")
            raise RemoteError(f"remote cache {self.shown}: {self.protocol}:// needs {package} ({one_line(e)})") from None
        except ValueError as e:
            if "Protocol not known" in str(e):
                raise RemoteError(f"remote cache {self.shown}: fsspec knows no protocol {self.protocol!r}") from None
            raise RemoteError(f"remote cache {self.shown}: {what} failed: {scrub(one_line(e))}") from None
        except PermissionError as e:
            raise RemoteError(f"remote cache {self.shown}: {what} refused ({scrub(one_line(e))}): check the "
                              "credentials the backend reads (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                              "~/.aws for s3://) and that they may read and write this prefix") from None
        except Exception as e:  # noqa: BLE001 -- botocore, aiohttp, paramiko...: each its own hierarchy
            name = type(e).__name__
            if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
                raise RemoteError(f"remote cache {self.shown}: no credentials ({scrub(one_line(e))}): set "
                                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile in ~/.aws") from None
            if "Connect" in name or "Timeout" in name or isinstance(e, (ConnectionError, TimeoutError)):
                raise RemoteError(f"remote cache {self.shown}: cannot reach it ({scrub(one_line(e))}); check the "
                                  "address (AWS_ENDPOINT_URL_S3 for an S3-compatible store) or build without it: "
                                  "--remote none") from None
            raise RemoteError(f"remote cache {self.shown}: {what} failed: {scrub(one_line(e))}") from None

    def _read_bounded(self, path: str, limit: int) -> Optional[bytes]:
        """The object at `path` (None when absent), refusing one larger than `limit`."""
        with self._errors(f"reading {path}"):
            try:
                with self.fs.open(path, "rb") as f:
                    data = f.read(limit + 1)
            except FileNotFoundError:
                return None
        if len(data) > limit:
            raise ValueError(f"larger than {limit} bytes")
        return data

    def _size(self, path: str) -> Optional[int]:
        with self._errors(f"looking up {path}"):
            try:
                return self.fs.info(path).get("size")
            except FileNotFoundError:
                return None

    def _staging(self) -> str:
        return self._path("tmp", f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}")

    def _put_file(self, local: Path, path: str) -> None:
        """Upload so that `path` is never seen half-written: straight there on a store whose PUT is atomic,
        else to a staging name and renamed."""
        with self._errors(f"uploading to {path}"):
            if self.atomic_put:
                self.fs.put_file(str(local), path)
                return
            tmp = self._staging()
            self.fs.makedirs(self._path("tmp"), exist_ok=True)
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            try:
                self.fs.put_file(str(local), tmp)
                self.fs.mv(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    if self.fs.exists(tmp):
                        self.fs.rm_file(tmp)

    def _publish_bytes(self, path: str, data: bytes, replace: bool) -> bool:
        """Write a manifest, all of it or nothing. Not `replace`: only if nothing is there yet (False when
        another writer got there first): S3's conditional PUT; a hard link on a local filesystem; elsewhere
        a check and a rename, where two writers racing leave the later one's manifest (also whole)."""
        with self._errors(f"publishing {path}"):
            if self.protocol in ("s3", "s3a"):
                try:
                    self.fs.pipe_file(path, data, **({} if replace else {"mode": "create"}))
                    return True
                except OSError:
                    if not replace and self._size(path) is not None:
                        return False  # 412 Precondition Failed: another writer published first
                    raise
            if self.atomic_put:
                if not replace and self._size(path) is not None:
                    return False
                self.fs.pipe_file(path, data)
                return True
            self.fs.makedirs(self._path("tmp"), exist_ok=True)
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = self._staging()
            self.fs.pipe_file(tmp, data)
            try:
                if replace:
                    self.fs.mv(tmp, path)
                    return True
                if self.protocol in ("file", "local"):
                    try:
                        self.fs.link(tmp, path)
                        return True
                    except FileExistsError:
                        return False
                if self.fs.exists(path):
                    return False
                self.fs.mv(tmp, path)
                return True
            finally:
                with contextlib.suppress(OSError):
                    if self.fs.exists(tmp):
                        self.fs.rm_file(tmp)

    # ------------------------------------------------------------------ what the engine calls

    def probe(self) -> None:
        """One request that proves the remote answers, the credentials are accepted and the bucket exists
        (RemoteError otherwise): look up a manifest no key has."""
        with self._errors("reading"):
            try:
                self.fs.info(self.entry_path("0" * 64))
            except FileNotFoundError as e:
                if "bucket" in str(e).lower():  # S3's NoSuchBucket: every write would fail
                    raise RemoteError(f"remote cache {self.shown}: {scrub(one_line(e))}: create it or fix "
                                      "the URL") from None

    def manifest(self, key: str) -> tuple[Optional[dict], Optional[str]]:
        """(manifest, None) when the remote has a well-formed entry for `key`; (None, None) when it has none;
        (None, problem) when what is there is damaged."""
        try:
            data = self._read_bounded(self.entry_path(key), MAX_MANIFEST_BYTES)
        except ValueError as e:
            return None, f"manifest {e}"
        if data is None:
            return None, None
        try:
            m = json.loads(data)
        except ValueError:
            return None, "manifest is not JSON (a partial or tampered upload?)"
        problem = manifest_problem(m, key)
        return (None, problem) if problem else (m, None)

    def download(self, m: dict, into: Path) -> Optional[str]:
        """Every file of manifest `m` into the empty directory `into`, each checked for its size and sha256
        as it streams in. None when all are right, else the first problem (and the bad blob is remembered,
        so a push from this machine re-uploads it)."""
        for rel, info in sorted(m["files"].items()):
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._errors(f"downloading {rel}"):
                try:
                    with open(target, "wb") as out:
                        size, digest = self._fetch_blob(info["sha256"], info["size"], out)
                except FileNotFoundError:
                    self.damaged_entries.add(m["key"])
                    return f"blob of {rel} is missing"
            if size != info["size"] or digest != info["sha256"]:
                self.damaged_blobs.add(info["sha256"])
                self.damaged_entries.add(m["key"])
                what = "size" if size != info["size"] else "sha256"
                return f"{rel}: {what} mismatch (a tampered or partial blob)"
        return None

    def _fetch_blob(self, sha: str, expected: int, out) -> tuple[int, str]:
        """Copy blob `sha` into the open file `out`, reading at most `expected` + 1 bytes (so a longer blob is
        caught without reading it all): (bytes read, their sha256). Ranged reads, one request for a blob up
        to _CHUNK; a blob of exactly `expected` bytes that ends on a chunk boundary costs one look-up more."""
        h, size = hashlib.sha256(), 0
        if expected == 0:  # nothing to read; a zero-length blob has but one sha256
            return 0, h.hexdigest()
        path = self.blob_path(sha)
        while size <= expected:
            if size == expected:  # all chunks were full: is there more?
                actual = self._size(path)
                return (size if actual == expected else size + 1), h.hexdigest()
            want = min(_CHUNK, expected + 1 - size)
            block = self.fs.cat_file(path, start=size, end=size + want)
            h.update(block)
            out.write(block)
            size += len(block)
            if len(block) < want:
                break
        return size, h.hexdigest()

    def publish(self, entry_dir: Path, m: dict) -> str:
        """Upload a sealed local entry (its remote manifest `m`; files under `entry_dir` already verified by
        the caller): blobs first, the manifest last. Returns "published", "present" (a whole entry is already
        there, ours or another machine's, and is left alone) or "repaired" (what was there was damaged, or
        failed a download here, and was replaced)."""
        key = m["key"]
        existing, problem = self.manifest(key)
        damaged = problem is not None or key in self.damaged_entries
        if existing is not None and not damaged:
            return "present"
        for rel, info in sorted(m["files"].items()):
            sha = info["sha256"]
            # a small blob is sent again rather than looked up first (one request either way: its name is
            # its content, so rewriting it changes nothing); a large one only when missing or damaged
            if (info["size"] <= SMALL_BLOB or sha in self.damaged_blobs
                    or self._size(self.blob_path(sha)) != info["size"]):
                self._put_file(entry_dir / rel, self.blob_path(sha))
                self.damaged_blobs.discard(sha)
        data = (json.dumps(m, sort_keys=True, indent=1) + "\n").encode()
        if not self._publish_bytes(self.entry_path(key), data, replace=damaged):
            return "present"  # another machine published this key between our look and our write
        self.damaged_entries.discard(key)
        return "repaired" if damaged else "published"


def open_remote(url: str) -> Remote:
    """A Remote for `url` that has answered one request (RemoteError otherwise)."""
    remote = Remote(url)
    remote.probe()
    return remote
