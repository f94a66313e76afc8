"""Execute a plan: stale stages in dependency order, each into a fresh tmp dir sealed into the cache.

Failure policy (ARCHITECTURE.md): a `StageFailure` is a result -- cached as a failed entry so rebuilds
do not retry it (`--force` does), dependents are skipped, exit status stays 0 (the report shows the
row as `failed: <reason>`). Any other exception is a bug: its traceback is printed (not for an
OptforgeError such as DataError, which is the user's to fix: exit 2), nothing is cached for it, the lock
file records the error; the build stops there, or with `keep_going` goes on with whatever does not
depend on it.

Remote cache (optforge.remote, optforge.sync): a stale stage whose key a remote has is downloaded,
verified and sealed locally ("pulled") instead of run; with `push`, every stage this build runs is
uploaded after it is sealed. A remote entry that fails a check is ignored with a warning and the stage
runs here; a remote that stops answering mid-build only costs that: the build goes on locally. An
upload that fails is a warning too, and the build's exit status becomes 2 (its results are safe here).

The lock file is rewritten after every stage, so a killed build keeps what it completed; each stage's
wall time goes to the cache's timings.json (optforge.timings), what the next `plan` expects it to take.
Long loops inside a stage report progress (`stage_progress`). Nothing here imports torch: stage runners
do, and only when a stage actually runs.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TextIO

from optforge import timings
from optforge.cache import Cache
from optforge.errors import OptforgeError, RemoteError, StageFailure
from optforge.lockfile import write_lock
from optforge.plan import StagePlan, select, skipped_below
from optforge.progress import DEFAULT_INTERVAL_S, LineProgress, interval_from_env
from optforge.remote import Remote
from optforge.session import Session, open_session, render, stage_results
from optforge.stages.base import StageContext
from optforge.sync import pull_stage, push_stage, remote_setting


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stdout(msg: str) -> None:
    print(msg, flush=True)


def stage_progress(stage: str, file: Optional[TextIO] = None, interval: float = DEFAULT_INTERVAL_S,
                   clock: Callable[[], float] = time.monotonic) -> Callable:
    """StageContext.progress for stage `stage`: on a terminal a tqdm bar (shown only after a second);
    elsewhere (a log, a pipe) a progress line every `interval` seconds (optforge.progress.LineProgress).
    `file`: where it goes (sys.stderr, as it is when a bar starts)."""

    def progress(iterable=None, total=None, desc: str = "", unit: str = "step"):
        stream = file or sys.stderr
        if getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            return tqdm(iterable=iterable, total=total, desc=f"{stage} {desc}".strip(), unit=unit, file=stream,
                        leave=False, delay=1.0, dynamic_ncols=True)
        return LineProgress(iterable, total, desc or stage, unit, prefix=f"  [{stage}] ", file=stream,
                            interval=interval, clock=clock)

    return progress


@dataclass
class BuildResult:
    outcomes: dict = field(default_factory=dict)  # stage name -> report result dict
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # StageFailure, now or recorded earlier, and crashes
    skipped: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)  # stages that raised something other than StageFailure
    user_errors: list[str] = field(default_factory=list)  # ... of which an OptforgeError (e.g. DataError)
    not_run: list[str] = field(default_factory=list)  # stopped before reaching them
    pulled: list[str] = field(default_factory=list)  # downloaded from the remote cache instead of run
    pushed: list[str] = field(default_factory=list)  # uploaded to the remote cache (this build ran them)
    push_failed: list[str] = field(default_factory=list)  # ran here, but the upload failed
    seconds: float = 0.0
    reports: list[Path] = field(default_factory=list)
    summary: str = ""

    @property
    def exit_code(self) -> int:
        # recorded StageFailures are results (a `failed:` report row), not a broken build
        if set(self.crashed) - set(self.user_errors):
            return 1  # a bug somewhere: its traceback was printed
        return 2 if self.crashed or self.push_failed else 0


def verify_inputs(session: Session, plans: list[StagePlan], selected: set[str]) -> None:
    """Full sha256 of every cached entry a running stage will read; a damaged one becomes stale and is
    rebuilt first, never loaded. Repeats because a newly stale stage has inputs of its own."""
    by_name = {p.name: p for p in plans}
    checked: set[str] = set()
    todo = True
    while todo:
        todo = False
        for p in plans:
            if p.name not in selected or p.status != "stale":
                continue
            for dep in session.graph[p.name].inputs.values():
                d = by_name[dep]
                if dep in checked or d.status != "fresh" or d.entry.status != "ok":
                    continue
                checked.add(dep)
                state = session.cache.state(d.key, deep=True)
                if state.status != "ok":
                    d.status, d.reasons, d.entry = "stale", [f"output corrupted: {state.reason}"], state
                    todo = True


def verify_all(session: Session, plans: list[StagePlan]) -> None:
    """`plan --verify`: full sha256 of every fresh entry (a slow plan that trusts nothing)."""
    for p in plans:
        if p.status == "fresh" and p.entry.status == "ok":
            state = session.cache.state(p.key, deep=True)
            if state.status != "ok":
                p.status, p.reasons, p.entry = "stale", [f"output corrupted: {state.reason}"], state


class Executor:
    def __init__(self, session: Session, plans: list[StagePlan], selected: set[str], force: set[str],
                 keep_going: bool, echo: Callable[[str], None], log: Callable[[str], None],
                 progress: Optional[float], remote: Optional[Remote] = None, push: bool = False):
        """`progress`: seconds between progress lines off a terminal (None: no progress at all). `remote`:
        read stale stages through it; `push`: upload what runs to it."""
        self.s, self.plans, self.selected, self.force = session, plans, selected, force
        self.keep_going, self.echo, self.log, self.progress = keep_going, echo, log, progress
        self.remote, self.push = remote, push
        self.keys = {p.name: p.key for p in plans}
        self.result = BuildResult()
        self.device_checked = False
        self.sealed: set[str] = set()  # keys sealed by this build (equal stages run once)
        self.unusable: set[str] = set()  # stages that failed or were skipped in this build

    def run(self) -> BuildResult:
        r = self.result
        for p in self.plans:
            if p.name not in self.selected:
                continue
            if r.crashed and not self.keep_going:
                r.not_run.append(p.name)
                continue
            blocked = skipped_below(self.s.graph, self.unusable, [p.name], self.s.kinds)
            if blocked:
                self._outcome(p, "skipped", reason=blocked[p.name])
                r.skipped.append(p.name)
                self.echo(f"{'skipped':<8}{p.name} ({blocked[p.name]})")
                continue
            if p.key in self.sealed:  # an equal stage of this build made it
                self._cached(p, self.s.cache.state(p.key))
            elif p.status == "fresh":
                self._cached(p, p.entry)
            else:
                self._run(p)
        gone = set(self.s.lock) - set(self.s.graph.names())
        if gone:  # stages the recipe no longer has: forget them so gc can reclaim their entries
            for name in gone:
                del self.s.lock[name]
            write_lock(self.s.lock_file, self.s.name, dict(self.s.lock))
        return r

    def _outcome(self, p: StagePlan, status: str, metrics=None, reason=None) -> None:
        self.result.outcomes[p.name] = {"status": status, "metrics": metrics or {}, "reason": reason,
                                        "key": p.key}
        if status in ("failed", "skipped"):
            self.unusable.add(p.name)

    def _record(self, p: StagePlan, state=None, error: Optional[str] = None) -> None:
        """Lock file after every stage, so a killed build keeps its progress. For an entry that holds
        code, its digest too: what a later plan trusts (optforge.plan.recorded_elsewise)."""
        record = dict(p.record)
        if state is not None and state.digest and self.s.kinds[p.kind].holds_code:
            record["digest"] = state.digest
        if error:
            record["error"] = error
        if self.s.lock.get(p.name) == record:
            return  # the usual case for cached stages: nothing to write
        self.s.lock[p.name] = record
        names = self.s.graph.names()
        write_lock(self.s.lock_file, self.s.name, {n: self.s.lock[n] for n in names if n in self.s.lock})

    def _cached(self, p: StagePlan, state) -> None:
        self._outcome(p, state.status, state.metrics, state.reason)
        if state.status == "failed":
            self.result.failed.append(p.name)
            self.echo(f"{'failed':<8}{p.name}: {state.reason} (recorded; --force {p.name} retries)")
        else:
            self.result.cached.append(p.name)
            self.echo(f"{'cached':<8}{p.name}")
        self._record(p, state)

    def _check_device(self) -> None:
        if self.s.device == "cuda" and not self.device_checked:
            import torch  # only now: a stage is about to run and will import it anyway

            if not torch.cuda.is_available():
                raise OptforgeError("device cuda was selected (an NVIDIA driver is present) but "
                                    "torch.cuda.is_available() is False; pass --device cpu")
        self.device_checked = True

    def _run(self, p: StagePlan) -> None:
        """Run a stale stage, unless another build makes the same entry: then wait for it and use it."""
        def waiting(pid: str) -> None:
            self.echo(f"waiting for {p.name} (being built by pid {pid})")

        with self.s.cache.key_lock(p.key, on_wait=waiting):
            if p.name not in self.force:
                state = self.s.cache.state(p.key)
                if state.status in ("ok", "failed") and state.digest != p.entry.digest:
                    # sealed since the plan (by another build): a new entry, not the one the plan distrusted
                    self._cached(p, state)
                    return
                if self.remote is not None and self._pull(p):
                    return
            self._run_stage(p)

    def _pull(self, p: StagePlan) -> bool:
        """Take `p`'s entry from the remote cache instead of running it (optforge.sync.pull_stage); False
        when the remote has no usable one, or stops answering (then the stage runs here)."""
        warn = lambda msg: self.log(f"warning: {msg}; running it here")  # noqa: E731
        try:
            state = pull_stage(self.s, p, self.remote, warn)
        except RemoteError as e:
            warn(str(e))
            return False
        if state is None or state.status not in ("ok", "failed"):
            return False
        self.sealed.add(p.key)
        self._outcome(p, state.status, state.metrics, state.reason)
        self.result.pulled.append(p.name)
        if state.status == "failed":
            self.result.failed.append(p.name)
        self._record(p, state)
        recorded = f" (a recorded failure: {state.reason})" if state.status == "failed" else ""
        self.echo(f"{'pulled':<8}{p.name}{recorded}")
        return True

    def _push(self, p: StagePlan) -> None:
        """Upload the entry this build just sealed; a failure is a warning (the build goes on) and exit 2."""
        if not self.push or self.remote is None:
            return
        try:
            outcome = push_stage(self.s, p, self.remote)
        except RemoteError as e:
            self.result.push_failed.append(p.name)
            self.log(f"warning: {p.name} was not pushed: {e}")
            return
        if outcome in ("published", "repaired", "present"):
            self.result.pushed.append(p.name)
        else:  # "damaged here": the entry just sealed no longer verifies (optforge.sync.push_stage)
            self.result.push_failed.append(p.name)
            self.log(f"warning: {p.name} was not pushed: its entry here is {outcome}")

    def _run_stage(self, p: StagePlan) -> None:
        cache, node, kind = self.s.cache, self.s.graph[p.name], self.s.kinds[p.kind]
        cache.check_writable(p.key)  # before the work, not after it: an unwritable cache is a CacheError
        self._check_device()
        usable = {role: dep for role, dep in node.inputs.items() if dep not in self.unusable}
        inputs = {role: cache.entry_dir(self.keys[dep]) for role, dep in usable.items()}
        input_metrics = {role: self.result.outcomes.get(dep, {}).get("metrics") or
                         (cache.manifest(self.keys[dep]) or {}).get("metrics", {})
                         for role, dep in usable.items()}
        tmp = cache.new_tmp()
        ctx = StageContext(name=p.name, kind=p.kind, params=self.s.params[p.name], inputs=inputs,
                           input_metrics=input_metrics, out=tmp, device=self.s.device,
                           data_files={role: Path(f) for role, f in node.data_files.items()},
                           progress=None if self.progress is None else stage_progress(p.name, interval=self.progress),
                           log=lambda msg, _n=p.name: self.log(f"  [{_n}] {msg}"))
        t0 = time.perf_counter()
        try:
            metrics = kind.run(ctx) or {}
            json.dumps(metrics)  # must be JSON-able: the manifest and the report read it
        except StageFailure as e:
            state = cache.commit(tmp, p.key, status="failed", metrics={}, reason=str(e), kind=p.kind,
                                 stage=p.name, replace=True)
            self._timed(p, time.perf_counter() - t0)
            self.sealed.add(p.key)
            self._outcome(p, "failed", reason=state.reason)
            self.result.failed.append(p.name)
            self._record(p, state)
            self.echo(f"{'failed':<8}{p.name}: {state.reason}")
            self._push(p)
            return
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: leave at once
                raise
            if isinstance(e, OptforgeError):  # e.g. DataError: the user's to fix, so no traceback
                reason = str(e)
                self.result.user_errors.append(p.name)
            else:
                reason = f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
            self._outcome(p, "failed", reason=reason)
            self.result.failed.append(p.name)
            self.result.crashed.append(p.name)
            self.echo(f"{'failed':<8}{p.name}: {reason}")
            self._record(p, error=reason)
            return
        # replace whatever is there: it was forced, damaged or distrusted (else the stage would not have run)
        state = cache.commit(tmp, p.key, status="ok", metrics=metrics, reason=None, kind=p.kind,
                             stage=p.name, replace=True)
        dt = time.perf_counter() - t0
        self._timed(p, dt)
        self.sealed.add(p.key)
        self._outcome(p, "ok", state.metrics or metrics)
        self.result.ran.append(p.name)
        self._record(p, state)  # before the line: whoever sees "ran X" can rely on the lock file having X
        self.echo(f"{'ran':<8}{p.name}  {dt:.1f}s")
        self._push(p)

    def _timed(self, p: StagePlan, seconds: float) -> None:
        """What the stage took, sealing its entry included: what the next `plan` expects it to take."""
        timings.record(self.s.cache, timings.machine_name(self.s.device_fp), self.s.name, p.name, p.kind, seconds)


def _summary(r: BuildResult) -> str:
    extra = ""
    if r.pulled:
        extra += f", {len(r.pulled)} pulled"
    if r.pushed:
        extra += f", {len(r.pushed)} pushed"
    if r.push_failed:
        extra += f", {len(r.push_failed)} not pushed (see the warnings)"
    if r.failed:
        extra += f", {len(r.failed)} failed"
    if r.skipped:
        extra += f", {len(r.skipped)} skipped"
    if r.crashed and r.not_run:
        return (f"build stopped: {r.crashed[0]} crashed; {len(r.ran)} ran, {len(r.cached)} cached{extra}, "
                f"{len(r.not_run)} not run in {r.seconds:.1f}s (--keep-going builds what does not depend on it)")
    if not r.ran and not r.crashed and not r.pulled:
        return f"nothing to do: {len(r.cached)} stages fresh{extra}"
    crashed = f"; crashed: {', '.join(r.crashed)} (see above)" if r.crashed else ""
    return f"build: {len(r.ran)} ran, {len(r.cached)} cached{extra} in {r.seconds:.1f}s{crashed}"


def dry_run_lines(plans: list[StagePlan], selected: set[str]) -> list[str]:
    lines = []
    for p in plans:
        if p.name in selected:
            verb = "would run" if p.status == "stale" else "cached"
            why = f"  ({'; '.join(p.reasons)})" if p.reasons else ""
            lines.append(f"{verb:<10}{p.name}{why}")
    stale = sum(p.status == "stale" for p in plans if p.name in selected)
    lines.append(f"dry run: {stale} would run, {len(selected) - stale} fresh")
    return lines


def build(recipe: Path | str, *, device: str = "auto", cache: Cache | None = None, display: str | None = None,
          trust_remote_code: Optional[bool] = None, remote: Optional[str] = None, push: Optional[bool] = None,
          **options) -> BuildResult:
    """`optforge build`: load and check the recipe, then `execute` it (options: see `execute`;
    `trust_remote_code`: see `open_session`; `remote`, `push`: the --remote and --push/--no-push flags,
    resolved with $OPTFORGE_REMOTE and the recipe's `cache` by optforge.sync.remote_setting)."""
    t0 = time.perf_counter()
    session = open_session(recipe, device, cache, display, trust_remote_code=trust_remote_code)
    setting = remote_setting(session.recipe, remote, push=push)
    return execute(session, started=t0, remote=Remote(setting.url) if setting else None,
                   push=bool(setting and setting.push), **options)


def execute(session: Session, *, force=(), until: Optional[str] = None, dry_run: bool = False,
            keep_going: bool = False, wait: bool = False, echo: Callable[[str], None] = _stdout,
            log: Callable[[str], None] = _stderr, progress: bool = True, render_report: bool = True,
            started: Optional[float] = None, remote: Optional[Remote] = None, push: bool = False) -> BuildResult:
    """Build `session`'s stale stages (dry_run: only say which). `progress`: long loops show a tqdm bar on a
    terminal, else a line every $OPTFORGE_PROGRESS_INTERVAL seconds on stderr; False: nothing. `remote`:
    a remote cache to read stale stages through (contacted only when a stage is stale: RemoteError when
    it does not answer then); `push`: upload what this build runs to it."""
    t0 = started if started is not None else time.perf_counter()
    force = set(force)
    selected = select(session.graph, until)
    if dry_run:
        plans = session.plan(force)
        for line in dry_run_lines(plans, selected):
            echo(line)
        return BuildResult(summary="dry run")
    interval = interval_from_env() if progress else None  # a bad value stops the build before it starts
    with session.cache.build_lock(), session.cache.recipe_lock(session.name, wait):
        session.reload_lock()  # under the lock: another build of this recipe may have just finished
        plans = session.plan(force)
        session.cache.register(session.lock_file)
        if any(p.status == "stale" for p in plans if p.name in selected):
            if remote is not None:
                remote.probe()  # an unreachable remote or refused credentials: one line, before any work
            session.cache.sweep_tmp()
            verify_inputs(session, plans, selected)
        result = Executor(session, plans, selected, force, keep_going, echo, log, interval, remote, push).run()
        session.save_hashes()
    result.seconds = time.perf_counter() - t0
    result.summary = _summary(result)
    if render_report:
        results = stage_results(session, plans, result.outcomes)
        result.reports = render(session, results, only_if_changed=True)
        for f in result.reports:
            echo(f"report: {f}")
    echo(result.summary)
    return result
