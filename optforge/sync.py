"""A recipe's entries between the local cache and a remote one (optforge.remote): which remote a command
uses, when a remote entry may stand in for a local build, and the loops of `optforge push` and
`optforge pull`. A build reading through a remote uses the same `pull_stage` and `push_stage`.

When a remote entry is taken (`distrust` is None), in this order:
  * it is a well-formed manifest of this very key (optforge.remote.manifest_problem), made by this kind;
  * a hardware-bound stage's manifest carries the device fingerprint this machine has (the key already
    includes it, so a timing or a compiled kernel is never reused on other hardware; checked again here
    so that nothing but an entry of this device is ever loaded);
  * an entry that holds code (compile: kernels that run when loaded) is taken only when the recipe's
    lock file, or another registered one, records its digest for this key: the lock file, committed
    beside the recipe, vouches for code a remote hands out; any other such entry is built here;
  * every file arrives with the size and sha256 its manifest gives.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

from optforge.cache import entry_digest
from optforge.cache_entry import EntryState
from optforge.device import fingerprint_summary
from optforge.errors import RemoteError
from optforge.fingerprint import sha256_json
from optforge.plan import StagePlan, select
from optforge.remote import Remote, remote_manifest
from optforge.remote_url import OFF, check_remote, redact
from optforge.session import Session

ENV = "OPTFORGE_REMOTE"


@dataclass(frozen=True)
class RemoteSetting:
    url: str
    push: bool  # a build also uploads what it runs
    source: str  # where the URL came from, for messages


def remote_setting(recipe, flag: Optional[str] = None, environ: Mapping[str, str] = os.environ,
                   push: Optional[bool] = None) -> Optional[RemoteSetting]:
    """The remote a command uses: `--remote` (flag), else $OPTFORGE_REMOTE, else the recipe's
    `cache.remote`; `none`/`off` means none. `push`: the --push/--no-push flag, else the recipe's
    `cache.push`. RemoteError for a URL that is not one, or --push with no remote."""
    spec = getattr(recipe, "cache", None)
    if flag is not None:
        url, source = flag, "--remote"
    elif environ.get(ENV, "").strip():
        url, source = environ[ENV], ENV
    elif spec is not None and spec.remote:
        url, source = spec.remote, "the recipe's cache.remote"
    else:
        url, source = None, None
    if url is None or url.strip().lower() in OFF:
        if push:
            raise RemoteError("--push needs a remote cache: set cache.remote in the recipe, OPTFORGE_REMOTE, "
                              "or --remote URL")
        return None
    try:
        url = check_remote(url)
    except ValueError as e:
        raise RemoteError(f"{source}: {e}") from None
    return RemoteSetting(url, bool(spec.push) if push is None and spec is not None else bool(push), source)


def distrust(session: Session, p: StagePlan, m: dict) -> Optional[str]:
    """Why the well-formed remote manifest `m` of `p.key` must not stand in for running `p` here, or None."""
    kind = session.kinds[p.kind]
    if m["kind"] != p.kind:
        return f"made by kind {m['kind']!r}, not {p.kind!r}"
    if kind.hardware_bound and sha256_json(m.get("device")) != sha256_json(session.device_fp):
        return f"made on another device ({fingerprint_summary(m.get('device'))})"
    if kind.holds_code:
        digest = entry_digest(m)
        old = session.lock.get(p.name) or {}
        recorded = old.get("digest") if old.get("key") == p.key else None
        if recorded != digest and not session.vouched(p.key, digest):
            return (f"it holds code (kind {p.kind}) that {session.lock_file.name} does not record for this key "
                    "(a lock file that records it, committed beside the recipe, lets it be pulled)")
    return None


def pull_stage(session: Session, p: StagePlan, remote: Remote, note: Callable[[str], None]) -> Optional[EntryState]:
    """Download `p`'s entry from `remote` into the local cache, all checked; its state, or None when the
    remote has no usable one (`note` says why, unless it simply has none). A transport failure raises
    RemoteError."""
    m, problem = remote.manifest(p.key)
    if problem is not None:
        remote.damaged_entries.add(p.key)
        note(f"remote entry of {p.name} ignored: {problem}")
        return None
    if m is None:
        return None
    why = distrust(session, p, m)
    if why is not None:
        note(f"remote entry of {p.name} not used: {why}")
        return None
    cache = session.cache
    tmp = cache.new_tmp()
    try:
        problem = remote.download(m, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if problem is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        note(f"remote entry of {p.name} ignored: {problem}")
        return None
    # replace: a local entry here was missing, damaged or distrusted (else the stage would be fresh)
    return cache.commit(tmp, p.key, status=m["status"], metrics=m["metrics"], reason=m.get("reason"),
                        kind=p.kind, stage=p.name, replace=True)


def push_stage(session: Session, p: StagePlan, remote: Remote) -> str:
    """Upload `p`'s local entry: "published", "present", "repaired" (optforge.remote.Remote.publish), or
    "not built" / "damaged here" (nothing uploaded: a local entry is verified in full before it leaves)."""
    state = session.cache.state(p.key, deep=True)
    if state.status == "missing":
        return "not built"
    if state.status not in ("ok", "failed"):
        return "damaged here"
    m = session.cache.manifest(p.key)
    return remote.publish(session.cache.entry_dir(p.key), remote_manifest(m, p.record.get("device")))


@dataclass
class SyncResult:
    done: dict[str, list[str]] = field(default_factory=dict)  # outcome -> stage names

    def add(self, outcome: str, name: str) -> None:
        self.done.setdefault(outcome, []).append(name)

    def count(self, outcome: str) -> int:
        return len(self.done.get(outcome, []))


def _selected_plans(session: Session, remote: Remote, until: Optional[str]) -> Iterator[StagePlan]:
    """The plans of `until` and what it depends on (every stage by default), after one request proves the
    remote answers; held under the shared build lock, so that no gc removes an entry meanwhile."""
    selected = select(session.graph, until)
    remote.probe()
    with session.cache.build_lock():
        yield from (p for p in session.plan() if p.name in selected)


def push(session: Session, remote: Remote, until: Optional[str] = None,
         echo: Callable[[str], None] = print) -> SyncResult:
    """`optforge push`: every stage of the recipe built here (ok or a recorded failure) that the remote
    lacks."""
    result = SyncResult()
    for p in _selected_plans(session, remote, until):
        # only what the plan trusts: not a missing, damaged or distrusted (another digest) entry
        outcome = push_stage(session, p, remote) if p.status == "fresh" else "not built"
        result.add(outcome, p.name)
        echo(f"{outcome:<12}{p.name}")
    return result


def pull(session: Session, remote: Remote, until: Optional[str] = None, echo: Callable[[str], None] = print,
         note: Callable[[str], None] = print) -> SyncResult:
    """`optforge pull`: every stage of the recipe not in the local cache that the remote has, checked."""
    result = SyncResult()
    for p in _selected_plans(session, remote, until):
        if p.status == "fresh":
            result.add("here", p.name)
            continue
        with session.cache.key_lock(p.key):
            state = pull_stage(session, p, remote, note)
        result.add("pulled" if state is not None else "not in remote", p.name)
        if state is not None:
            echo(f"{'pulled':<12}{p.name}")
    session.save_hashes()
    return result


ORDER = ("published", "repaired", "pulled", "present", "here", "not in remote", "not built", "damaged here")


def summary(verb: str, result: SyncResult, remote: Remote) -> str:
    """`push s3://bucket/prefix: 12 published, 8 present`: counts in a fixed order, the URL redacted."""
    done = sorted(result.done.items(), key=lambda item: ORDER.index(item[0]) if item[0] in ORDER else len(ORDER))
    parts = [f"{len(names)} {outcome}" for outcome, names in done]
    return f"{verb} {redact(remote.url)}: {', '.join(parts) or 'nothing to do'}"
