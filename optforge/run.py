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

Who runs a stale stage is the executor's business (optforge.executors: this process, one at a time in
plan order, by default; `--executor dask`: every ready stage at once on a Dask cluster); what its outcome
means (the lock file, the report's results, the printed line, the exit status) is decided here, in the
build's own process, the same for every executor.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from optforge import timings
from optforge.cache import Cache
from optforge.errors import ExecutorError, RemoteError
from optforge.executors import Executor, LocalExecutor, executor_for
from optforge.lockfile import write_lock
from optforge.plan import StagePlan, select, skipped_below
from optforge.progress import interval_from_env
from optforge.remote import Remote
from optforge.session import Session, open_session, render, stage_results
from optforge.stage_job import PUBLISHED, Attempt, StageJob
from optforge.sync import pull_stage, push_stage, remote_setting


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stdout(msg: str) -> None:
    print(msg, flush=True)


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


class Build:
    """One build's bookkeeping: which selected stage is ready, skipped, cached or handed to the executor,
    and what each outcome means for the lock file, the report and the printed lines. Only this process
    writes them, whichever executor runs the stages (optforge.executors)."""

    def __init__(self, session: Session, plans: list[StagePlan], selected: set[str], force: set[str],
                 keep_going: bool, echo: Callable[[str], None], log: Callable[[str], None],
                 progress: Optional[float], remote: Optional[Remote] = None, push: bool = False):
        """`progress`: seconds between progress lines off a terminal (None: no progress at all). `remote`:
        read stale stages through it; `push`: upload what runs to it."""
        self.s, self.plans, self.selected, self.force = session, plans, selected, force
        self.keep_going, self.echo, self.log, self.progress = keep_going, echo, log, progress
        self.remote, self.push = remote, push
        self.by_name = {p.name: p for p in plans}
        self.result = BuildResult()
        self.sealed: set[str] = set()  # keys sealed by this build (equal stages run once)
        self.unusable: set[str] = set()  # stages that failed or were skipped in this build
        self.on_remote: set[str] = set()  # keys this build saw published on the remote (own_cache inputs)

    def run(self, executor: Executor) -> BuildResult:
        """Hand every stale selected stage to `executor` once its inputs are done: one at a time in plan
        order (a sequential executor: what a local build always did), or all that are ready at once."""
        r = self.result
        pending = [p for p in self.plans if p.name in self.selected]
        done: set[str] = set()
        running: dict[str, StagePlan] = {}
        while pending or running:
            for p in list(pending):
                if r.crashed and not self.keep_going:  # stop: nothing new starts; what runs finishes
                    r.not_run.extend(q.name for q in pending)
                    pending.clear()
                    break
                if any(dep not in done for dep in self.s.graph[p.name].inputs.values()):
                    continue
                if any(q.key == p.key for q in running.values()):
                    continue  # an equal stage is being made: use its entry when it is
                pending.remove(p)
                if self._settle(p):
                    done.add(p.name)
                elif executor.own_cache and self.s.graph[p.name].data_files:
                    # it reads files named by paths on this machine: it runs here, and the workers that
                    # need its entry get it through the remote (published with their job's inputs)
                    here = LocalExecutor(self.echo, self.log)
                    here.submit(self._job(p, here))
                    for attempt in here.wait():
                        self._finish(p, attempt, here)
                    done.add(p.name)
                else:
                    executor.submit(self._job(p, executor))
                    running[p.name] = p
                    if not executor.concurrent:
                        break
            if running:
                for attempt in executor.wait():
                    self._finish(running.pop(attempt.name), attempt, executor)
                    done.add(attempt.name)
            elif pending:  # nothing runs and nothing can start: our bug (a cycle the graph check missed?)
                raise RuntimeError(f"no selected stage can start: {[p.name for p in pending]}")
        gone = set(self.s.lock) - set(self.s.graph.names())
        if gone:  # stages the recipe no longer has: forget them so gc can reclaim their entries
            for name in gone:
                del self.s.lock[name]
            write_lock(self.s.lock_file, self.s.name, dict(self.s.lock))
        return r

    def _settle(self, p: StagePlan) -> bool:
        """Whatever needs no executor: skipped below a failure, made by an equal stage of this build, or
        fresh. False: `p` must run."""
        blocked = skipped_below(self.s.graph, self.unusable, [p.name], self.s.kinds)
        if blocked:
            self._outcome(p, "skipped", reason=blocked[p.name])
            self.result.skipped.append(p.name)
            self.echo(f"{'skipped':<8}{p.name} ({blocked[p.name]})")
        elif p.key in self.sealed:  # an equal stage of this build made it
            self._cached(p, self.s.cache.state(p.key))
        elif p.status == "fresh":
            self._cached(p, p.entry)
        else:
            return False
        return True

    def _job(self, p: StagePlan, executor: Executor) -> StageJob:
        usable = {role: dep for role, dep in self.s.graph[p.name].inputs.items() if dep not in self.unusable}
        inputs = {role: self.by_name[dep] for role, dep in usable.items()}
        metrics = {role: self.result.outcomes.get(d.name, {}).get("metrics") or
                   (self.s.cache.manifest(d.key) or {}).get("metrics", {}) for role, d in inputs.items()}
        if executor.own_cache:
            self._publish_inputs(inputs.values())
        return StageJob(self.s, p, inputs, metrics, forced=p.name in self.force, remote=self.remote,
                        push=self.push and executor.concurrent, own_cache=executor.own_cache,
                        progress=self.progress, bars=not executor.concurrent, machine_lock=executor.concurrent)

    def _publish_inputs(self, inputs) -> None:
        """Workers elsewhere read inputs from the remote: publish those this build has and it lacks."""
        for d in inputs:
            if d.key in self.on_remote:
                continue
            try:
                outcome = push_stage(self.s, d, self.remote)
            except RemoteError as e:
                self.log(f"warning: input {d.name} was not published: {e}")
                continue
            if outcome in PUBLISHED:
                self.on_remote.add(d.key)

    def _finish(self, p: StagePlan, attempt: Attempt, executor: Executor) -> None:
        """Record what the executor made of `p`."""
        if executor.own_cache and attempt.action in ("ran", "failed"):
            attempt = self._fetch(p, attempt)
        if attempt.action == "cached":
            self._cached(p, attempt.state)
        elif attempt.action == "pulled":
            self._pulled(p, attempt.state)
        elif attempt.action == "crashed":
            self._crashed(p, attempt)
        else:
            self._ran(p, attempt)

    def _fetch(self, p: StagePlan, attempt: Attempt) -> Attempt:
        """A worker elsewhere published `p`'s entry: pull it here (a crash if it does not come back whole).
        The digest the worker reports is recorded first: an entry that holds code comes from the remote
        only when the lock file vouches for it (optforge.sync.distrust)."""
        self.on_remote.add(p.key)
        self._record(p, attempt.state)
        notes: list[str] = []
        with self.s.cache.key_lock(p.key):
            try:
                state = pull_stage(self.s, p, self.remote, notes.append)
            except RemoteError as e:
                state, notes = None, [str(e)]
        if state is None or state.digest != attempt.state.digest:
            why = "; ".join(notes) or "the remote entry is not the one the worker sealed"
            return Attempt(p.name, "crashed", reason=f"its entry did not come back from the remote cache: {why}",
                           user_error=True)
        attempt.state = state
        return attempt

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

    def _pulled(self, p: StagePlan, state) -> None:
        self.sealed.add(p.key)
        self._outcome(p, state.status, state.metrics, state.reason)
        self.result.pulled.append(p.name)
        if state.status == "failed":
            self.result.failed.append(p.name)
        self._record(p, state)
        recorded = f" (a recorded failure: {state.reason})" if state.status == "failed" else ""
        self.echo(f"{'pulled':<8}{p.name}{recorded}")

    def _crashed(self, p: StagePlan, attempt: Attempt) -> None:
        if attempt.traceback:
            print(attempt.traceback, end="", file=sys.stderr, flush=True)
        if attempt.user_error:
            self.result.user_errors.append(p.name)
        self._outcome(p, "failed", reason=attempt.reason)
        self.result.failed.append(p.name)
        self.result.crashed.append(p.name)
        self.echo(f"{'failed':<8}{p.name}: {attempt.reason}")
        self._record(p, error=attempt.reason)

    def _ran(self, p: StagePlan, attempt: Attempt) -> None:
        """A stage that ran: sealed ok, or a StageFailure sealed as a failed entry."""
        state = attempt.state
        self._timed(p, attempt.seconds)
        self.sealed.add(p.key)
        if attempt.action == "failed":
            self._outcome(p, "failed", reason=state.reason)
            self.result.failed.append(p.name)
            self._record(p, state)
            self.echo(f"{'failed':<8}{p.name}: {state.reason}")
        else:
            self._outcome(p, "ok", state.metrics)
            self.result.ran.append(p.name)
            self._record(p, state)  # before the line: whoever sees "ran X" can rely on the lock file having X
            self.echo(f"{'ran':<8}{p.name}  {attempt.seconds:.1f}s")
        self._pushed(p, attempt)

    def _pushed(self, p: StagePlan, attempt: Attempt) -> None:
        """Upload the entry this build just sealed (unless the executor did); a failure is a warning (the
        build goes on) and exit 2."""
        if not self.push or self.remote is None:
            return
        outcome, error = attempt.pushed, attempt.push_error
        if outcome is None and error is None:
            try:
                outcome = push_stage(self.s, p, self.remote)
            except RemoteError as e:
                error = str(e)
        if error is not None:
            self.result.push_failed.append(p.name)
            self.log(f"warning: {p.name} was not pushed: {error}")
        elif outcome in PUBLISHED:
            self.result.pushed.append(p.name)
        else:  # "damaged here": the entry just sealed no longer verifies (optforge.sync.push_stage)
            self.result.push_failed.append(p.name)
            self.log(f"warning: {p.name} was not pushed: its entry here is {outcome}")

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
          executor: str = "local", address: Optional[str] = None, **options) -> BuildResult:
    """`optforge build`: load and check the recipe, then `execute` it (options: see `execute`;
    `trust_remote_code`: see `open_session`; `remote`, `push`: the --remote and --push/--no-push flags,
    resolved with $OPTFORGE_REMOTE and the recipe's `cache` by optforge.sync.remote_setting; `executor`,
    `address`: --executor local|dask and --address, optforge.executors.executor_for)."""
    t0 = time.perf_counter()
    session = open_session(recipe, device, cache, display, trust_remote_code=trust_remote_code)
    setting = remote_setting(session.recipe, remote, push=push)
    echo, log = options.get("echo", _stdout), options.get("log", _stderr)
    return execute(session, started=t0, remote=Remote(setting.url) if setting else None,
                   push=bool(setting and setting.push),
                   executor=executor_for(executor, address, session.device, echo, log), **options)


def execute(session: Session, *, force=(), until: Optional[str] = None, dry_run: bool = False,
            keep_going: bool = False, wait: bool = False, echo: Callable[[str], None] = _stdout,
            log: Callable[[str], None] = _stderr, progress: bool = True, render_report: bool = True,
            started: Optional[float] = None, remote: Optional[Remote] = None, push: bool = False,
            executor: Optional[Executor] = None) -> BuildResult:
    """Build `session`'s stale stages (dry_run: only say which). `progress`: long loops show a tqdm bar on a
    terminal, else a line every $OPTFORGE_PROGRESS_INTERVAL seconds on stderr; False: nothing. `remote`:
    a remote cache to read stale stages through (contacted only when a stage is stale: RemoteError when
    it does not answer then); `push`: upload what this build runs to it. `executor`: who runs the stale
    stages (optforge.executors; default: this process, one at a time), started only when one is stale."""
    executor = executor or LocalExecutor(echo, log)
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
        try:
            stale = [p for p in plans if p.name in selected and p.status == "stale"]
            if stale:
                if executor.own_cache and remote is None:
                    raise ExecutorError("workers on other machines (--address) get their inputs and return "
                                        "their outputs through a remote cache: name one (--remote URL, "
                                        "$OPTFORGE_REMOTE or the recipe's cache.remote)")
                if remote is not None:
                    remote.probe()  # an unreachable remote or refused credentials: one line, before any work
                session.cache.sweep_tmp()
                verify_inputs(session, plans, selected)  # may make more stages stale
                executor.start({p.name: StageJob(session, p, {}, {}).resources
                                for p in plans if p.name in selected and p.status == "stale"})
            result = Build(session, plans, selected, force, keep_going, echo, log, interval, remote, push).run(executor)
        finally:
            executor.close()
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
