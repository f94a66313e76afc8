"""Who runs a build's stale stages: the `Executor` protocol, and `LocalExecutor`, the build's own process
running one stage at a time in plan order (what a build always did, and the default). `--executor dask`
(optforge.dask_executor) runs every stage whose inputs are done at once, each a task on a Dask cluster.

Whatever the executor, the build's own process (optforge.run.Build) decides what runs, writes the lock
file and renders the report; an executor only turns `StageJob`s into `Attempt`s (optforge.stage_job), so a
build's lock file and report are the same whoever ran its stages (its timings apart).
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from optforge.errors import ExecutorError, one_line
from optforge.stage_job import Attempt, StageJob, run_job

EXECUTORS = ("local", "dask")


class Executor(Protocol):
    concurrent: bool  # hand it every stage that is ready (True), or one at a time in plan order
    own_cache: bool  # its workers seal into caches of their own: entries come and go through the remote

    def start(self, needs: dict[str, dict[str, int]]) -> None:
        """Before the first job (only when a stage is stale): start or reach the engine, and check that it
        can run every stage of `needs` (stage name -> the resources it asks for); ExecutorError if not."""

    def submit(self, job: StageJob) -> None: ...

    def wait(self) -> list[Attempt]:
        """Block until at least one submitted job is done; their attempts."""

    def close(self) -> None:
        """Stop what still runs (a stopped or interrupted build) and release the engine."""


class LocalExecutor:
    """The build's own process: a job runs when submitted, with the build's echo and log."""

    concurrent = False
    own_cache = False

    def __init__(self, echo: Callable[[str], None], log: Callable[[str], None]):
        self.echo, self.log = echo, log
        self.done: list[Attempt] = []

    def start(self, needs: dict[str, dict[str, int]]) -> None:
        pass

    def submit(self, job: StageJob) -> None:
        self.done.append(run_job(job, self.echo, self.log))

    def wait(self) -> list[Attempt]:
        done, self.done = self.done, []
        return done

    def close(self) -> None:
        pass


def executor_for(name: str, address: Optional[str], device: str, echo: Callable[[str], None],
                 log: Callable[[str], None]) -> Executor:
    """`--executor NAME [--address ADDR]`; ExecutorError for a combination that cannot work or an engine
    that is not installed."""
    if name == "local":
        if address is not None:
            raise ExecutorError("--address names a Dask scheduler: it needs --executor dask")
        return LocalExecutor(echo, log)
    if name != "dask":
        raise ExecutorError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
    try:
        from optforge.dask_executor import DaskExecutor
    except ImportError as e:
        raise ExecutorError(f"--executor dask needs dask and distributed ({one_line(e)}): "
                            "pip install 'optforge[dask]'") from None
    return DaskExecutor(address, device, log)
