"""One stale stage, run wherever an executor puts it (optforge.executors): in the build's own process, or in a
Dask worker. A `StageJob` carries everything the stage needs (picklable: the session, the stage's plan,
its usable inputs' plans and metrics); `run_job` runs it and returns an `Attempt`, which the build
(optforge.run.Build) turns into the lock file, the report's result and the printed line. Nothing here
writes the lock file or prints a build's summary: only the build's own process does.

Where the entry goes (`StageJob.own_cache`):
  * False: into the build's cache (`session.cache`): the build's own process, or workers on the same
    machine (a local cluster). Under the key lock, as a local build always did: an entry sealed by
    another build since the plan is taken ("cached"), then the remote cache is read ("pulled"), and only
    then does the stage run.
  * True: workers possibly on other machines (`--address`): the worker seals into its own local cache
    (`$OPTFORGE_CACHE` there, else `./.optforge`), after pulling each input from the remote cache
    (optforge.sync.pull_stage, every file checked), and publishes the entry to the remote
    (optforge.sync.push_stage), from which the build pulls it back. A hardware-bound stage runs only on a
    worker whose device fingerprint is the build's: its key, and so its timings, name that device.

`machine_share` (a reader-writer lock, `machine_lock_path`: one per machine on a CPU build, one per GPU on
a CUDA build): a stage that measures time (benchmark, serve_benchmark, lm_benchmark) holds it
exclusively, every other stage shared, so no timing is ever taken beside other work on the same CPU, or
on the same GPU; the build's own process (the local executor) runs one stage at a time and takes none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from optforge.cache import Cache
from optforge.cache_entry import EntryState
from optforge.device import device_fingerprint, fingerprint_summary
from optforge.errors import OptforgeError, RemoteError, StageFailure, one_line
from optforge.fingerprint import sha256_json
from optforge.plan import StagePlan
from optforge.progress import stage_progress
from optforge.remote import Remote
from optforge.session import Session
from optforge.stages.base import StageContext, StageKind
from optforge.sync import pull_stage, push_stage

GPU, CPU_BENCH = "GPU", "cpu_bench"  # Dask worker resources (`dask worker --resources "cpu_bench=1"`)
PUBLISHED = ("published", "present", "repaired")  # push_stage outcomes that leave the entry on the remote
_device_checked: set[str] = set()  # devices this process has confirmed


@dataclass
class StageJob:
    session: Session  # the build's: graph, kinds, params, device, its lock (what `distrust` reads)
    plan: StagePlan
    inputs: dict[str, StagePlan]  # role -> the plan of an input that is usable (not failed, not skipped)
    input_metrics: dict[str, dict]  # role -> that input's metrics
    forced: bool = False  # --force: run even if an entry appeared since the plan
    remote: Optional[Remote] = None  # read the stage through it first (not own_cache: the build did)
    push: bool = False  # publish the sealed entry to `remote` here (own_cache: always)
    own_cache: bool = False
    progress: Optional[float] = None  # seconds between progress lines; None: no progress
    bars: bool = True  # tqdm bars on a terminal (False in workers: several stages share one terminal)
    machine_lock: bool = False  # take `machine_share` around the stage (workers)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def resources(self) -> dict[str, int]:
        return resources_for(self.session.kinds[self.plan.kind], self.session.device)


def resources_for(kind: StageKind, device: str) -> dict[str, int]:
    """What a stage asks a Dask worker for: on a CUDA build every torch stage a GPU (one worker per GPU);
    a stage that measures time on the CPU `cpu_bench`, which one worker per machine offers, so two
    benchmarks never run at once on one machine (and machine_share keeps every other stage off it)."""
    if device == "cuda" and kind.uses_torch:
        return {GPU: 1}
    if kind.measures_time:
        return {CPU_BENCH: 1}
    return {}


@dataclass
class Attempt:
    """What became of a job. action: "cached" (an entry sealed since the plan, by another build), "pulled"
    (from the remote cache), "ran", "failed" (a StageFailure, cached as such), "crashed" (any other
    exception: nothing cached). `state`: the entry as sealed (not for "crashed")."""

    name: str
    action: str
    state: Optional[EntryState] = None
    reason: Optional[str] = None  # crashed: the error
    seconds: float = 0.0  # ran / failed: the stage's wall time, sealing included
    user_error: bool = False  # crashed with an OptforgeError (the user's to fix: no traceback)
    traceback: Optional[str] = None  # crashed with anything else
    pushed: Optional[str] = None  # published here: optforge.sync.push_stage's outcome
    push_error: Optional[str] = None  # ... or why not


def check_device(device: str) -> None:
    """Before the first stage that runs in this process: --device cuda needs torch to see a GPU."""
    if device == "cuda" and device not in _device_checked:
        import torch  # only now: a stage is about to run and will import it anyway

        if not torch.cuda.is_available():
            raise OptforgeError("device cuda was selected (an NVIDIA driver is present) but "
                                "torch.cuda.is_available() is False; pass --device cpu")
    _device_checked.add(device)


def machine_lock_path(device: str = "cpu", environ=os.environ) -> Path:
    """The lock a stage of a `device` build takes (machine_share). CPU: one per machine, since every stage
    shares its cores. CUDA: one per GPU, the first of the worker's CUDA_VISIBLE_DEVICES (what torch calls
    cuda:0; unset: GPU 0), so two GPUs' benchmarks run at once and a benchmark never shares its GPU. Two
    workers that name one GPU differently (an index and a UUID) do not exclude each other."""
    name = "machine"
    if device == "cuda":
        first = (environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
        name = "gpu-" + "".join(c if c.isalnum() or c == "-" else "_" for c in first)
    return Path(tempfile.gettempdir()) / f"optforge-{name}-{os.getuid()}.lock"


@contextlib.contextmanager
def machine_share(exclusive: bool, path: Optional[Path] = None):
    """A machine-wide reader-writer lock (flock): exclusive for a stage that measures time, shared for every
    other. Writers first: a waiting writer holds the turnstile, so no new reader slips in ahead of it."""
    path = path or machine_lock_path()
    with open(path.with_suffix(".turnstile"), "a+") as turnstile, open(path, "a+") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        else:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


def run_job(job: StageJob, echo: Callable[[str], None], log: Callable[[str], None]) -> Attempt:
    """Run `job`'s stage (see the module docstring for where its entry goes). A StageFailure and any other
    exception of the stage are results (an Attempt); a KeyboardInterrupt leaves at once; an unusable device
    or cache raises OptforgeError (the build stops, as a local build does)."""
    if job.own_cache:
        return _run_in_own_cache(job, log)
    s, p = job.session, job.plan

    def waiting(pid: str) -> None:
        echo(f"waiting for {p.name} (being built by pid {pid})")

    with s.cache.key_lock(p.key, on_wait=waiting):
        if not job.forced:
            state = s.cache.state(p.key)
            if state.status in ("ok", "failed") and state.digest != p.entry.digest:
                # sealed since the plan (by another build): a new entry, not the one the plan distrusted
                return Attempt(p.name, "cached", state)
            if job.remote is not None:
                pulled = _pull(s, p, job.remote, log)
                if pulled is not None:
                    return Attempt(p.name, "pulled", pulled)
        return _run_stage(job, s, log)


def _pull(session: Session, p: StagePlan, remote: Remote, log: Callable[[str], None]) -> Optional[EntryState]:
    """`p`'s entry from the remote cache, or None when it has no usable one or stops answering (then the
    stage runs here; the note says why)."""
    warn = lambda msg: log(f"warning: {msg}; running it here")  # noqa: E731
    try:
        state = pull_stage(session, p, remote, warn)
    except RemoteError as e:
        warn(str(e))
        return None
    return state if state is not None and state.status in ("ok", "failed") else None


def _run_stage(job: StageJob, s: Session, log: Callable[[str], None]) -> Attempt:
    p = job.plan
    cache, node, kind = s.cache, s.graph[p.name], s.kinds[p.kind]
    cache.check_writable(p.key)  # before the work, not after it: an unwritable cache is a CacheError
    check_device(s.device)
    tmp = cache.new_tmp()
    progress = (None if job.progress is None
                else stage_progress(p.name, interval=job.progress, bars=job.bars))
    ctx = StageContext(name=p.name, kind=p.kind, params=s.params[p.name],
                       inputs={role: cache.entry_dir(d.key) for role, d in job.inputs.items()},
                       input_metrics=dict(job.input_metrics), out=tmp, device=s.device,
                       data_files={role: Path(f) for role, f in node.data_files.items()},
                       progress=progress, log=lambda msg, _n=p.name: log(f"  [{_n}] {msg}"))
    lock = (machine_share(kind.measures_time, machine_lock_path(s.device)) if job.machine_lock
            else contextlib.nullcontext())
    t0 = time.perf_counter()
    try:
        with lock:
            t0 = time.perf_counter()  # the stage's time starts once it holds the machine, not while it waits
            metrics = kind.run(ctx) or {}
        json.dumps(metrics)  # must be JSON-able: the manifest and the report read it
    except StageFailure as e:
        state = cache.commit(tmp, p.key, status="failed", metrics={}, reason=str(e), kind=p.kind,
                             stage=p.name, replace=True)
        return _pushed(job, s, Attempt(p.name, "failed", state, seconds=time.perf_counter() - t0))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: leave at once
            raise
        if isinstance(e, OptforgeError):  # e.g. DataError: the user's to fix, so no traceback
            return Attempt(p.name, "crashed", reason=str(e), user_error=True)
        return Attempt(p.name, "crashed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    # replace whatever is there: it was forced, damaged or distrusted (else the stage would not have run)
    state = cache.commit(tmp, p.key, status="ok", metrics=metrics, reason=None, kind=p.kind,
                         stage=p.name, replace=True)
    return _pushed(job, s, Attempt(p.name, "ran", state, seconds=time.perf_counter() - t0))


def _pushed(job: StageJob, s: Session, attempt: Attempt) -> Attempt:
    """Publish the entry just sealed when the job says so (the build's own process pushes after its line)."""
    if not (job.push or job.own_cache) or job.remote is None:
        return attempt
    try:
        attempt.pushed = push_stage(s, job.plan, job.remote)
    except RemoteError as e:
        attempt.push_error = str(e)
    return attempt


def _run_in_own_cache(job: StageJob, log: Callable[[str], None]) -> Attempt:
    """A worker elsewhere: inputs pulled from the remote into this worker's cache, the stage run and sealed
    there, then published; a missing input or another device is this stage's crash (a user's error)."""
    p = job.plan
    s = replace(job.session, cache=Cache())
    try:
        if s.kinds[p.kind].hardware_bound:
            here = device_fingerprint(s.device, s.cache.root)
            if sha256_json(here) != sha256_json(s.device_fp):
                raise OptforgeError(f"this worker's device ({fingerprint_summary(here)}) is not the build's "
                                    f"({fingerprint_summary(s.device_fp)}); {p.kind} stages are measured on "
                                    "the build's device: give that machine's workers the resource this stage "
                                    "asks for, and no other")
        for role, dep in job.inputs.items():
            with s.cache.key_lock(dep.key):
                if s.cache.state(dep.key).status not in ("ok", "failed"):
                    notes: list[str] = []
                    if pull_stage(s, dep, job.remote, notes.append) is None:
                        why = f": {'; '.join(notes)}" if notes else ""
                        raise OptforgeError(f"input {dep.name} is not in the remote cache "
                                            f"{job.remote.shown}{why}")
        with s.cache.key_lock(p.key):
            attempt = _run_stage(job, s, log)
    except OptforgeError as e:
        return Attempt(p.name, "crashed", reason=one_line(e, None), user_error=True)
    if attempt.action in ("ran", "failed") and attempt.pushed not in PUBLISHED:
        why = attempt.push_error or f"its entry there is {attempt.pushed}"
        attempt.action, attempt.user_error = "crashed", True
        attempt.reason = f"ran on a worker, but could not be published to the remote cache: {why}"
    return attempt
