"""`optforge build --executor dask [--address ADDR]`: every stale stage whose inputs are done runs at once,
one Dask task each (`optforge.stage_job.run_job` in a worker), with the resources it asks for
(`stage_job.resources_for`: `GPU` for a torch stage of a CUDA build, `cpu_bench` for a stage that
measures time on the CPU).

Without an address a local cluster is started for the build and closed after it: worker *processes* (torch
stages must not share an interpreter's thread pools), one thread each, no memory limit, torch's thread
count left alone (Dask caps OMP/MKL threads at 1 in workers it spawns: optforge's stages choose their own).
On the CPU, min(cores, 4) workers, the first one offering `cpu_bench=1`; on a CUDA build one worker per
visible GPU, offering `GPU=1`. They share the build's cache directory. With `--address` the workers are
the cluster's own, possibly elsewhere: each seals into its own cache, and entries travel through the
remote cache (optforge.stage_job). Worker logs go to the workers' stderr: a local cluster's are the
build's terminal.

Ctrl-C: while the executor runs, SIGINT only sets a flag (a second one raises at once), and the build's
main thread, waiting for stages on a queue that the futures' callbacks fill (not inside Dask), raises
KeyboardInterrupt there, at a point where nothing is half done. Raised wherever the signal lands, it was
lost when it landed in Dask's garbage-collection callback ("Exception ignored", the build then waited for
the running stage), and inside Dask's `sync()` Dask logged a NameError traceback (distributed 2026.8).
`close` then cancels what runs and stops a local cluster (and raises a Ctrl-C that came after the last
`wait`, so such a build still ends interrupted). Its
workers (this module is their preload: `dask_setup`, `dask_teardown`) ignore SIGINT, which a terminal's
Ctrl-C sends them too (they would stop on their own and print tracebacks): the build stops them. Their
teardown logs nothing (a heartbeat cut short by it logs a traceback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, Optional

import dask
import distributed

from optforge.errors import ExecutorError, OptforgeError, one_line
from optforge.quiet import quiet_imports, quieted
from optforge.stage_job import CPU_BENCH, GPU, Attempt, StageJob, run_job

MAX_LOCAL_CPU_WORKERS = 4
# what Dask sets in the workers it spawns, less the thread caps (OMP/MKL/OpenBLAS at 1): a local build
# runs its stages at torch's thread count, and a distributed one must measure and train the same way
SPAWN_ENVIRON = {"MALLOC_TRIM_THRESHOLD_": 65536}


def local_workers(device: str, cores: int, gpus: list[str]) -> dict[str, dict]:
    """Worker name -> its Nanny options for a local cluster (pure)."""
    if device == "cuda":
        return {f"gpu{gpu}": {"resources": {GPU: 1}, "env": {"CUDA_VISIBLE_DEVICES": gpu}} for gpu in gpus or ["0"]}
    n = max(1, min(cores, MAX_LOCAL_CPU_WORKERS))
    return {f"cpu{i}": {"resources": {CPU_BENCH: 1} if i == 0 else {}, "env": {}} for i in range(n)}


def visible_gpus(environ=os.environ) -> list[str]:
    """The GPU ids a CUDA build may use: CUDA_VISIBLE_DEVICES, else every GPU the driver lists."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    gpus = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(gpus.iterdir())))] if gpus.is_dir() else []


def missing_resources(needs: dict[str, dict[str, int]], offered: list[dict]) -> Optional[tuple[str, dict]]:
    """(a stage, what it asks for) that no worker of `offered` (each worker's resources) can run, or None."""
    for stage, need in needs.items():
        if not any(all(w.get(r, 0) >= n for r, n in need.items()) for w in offered):
            return stage, need
    return None


def dask_setup(worker) -> None:
    """A local worker, as it starts (the Dask preload hook; its main thread): Ctrl-C is the build's to
    handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def dask_teardown(worker) -> None:
    """A local worker, as it closes: its teardown is the build's doing, and no news."""
    logging.disable(logging.CRITICAL)


def _work(job: StageJob, quiet: bool) -> Attempt:
    """The task: the stage in this worker (its logs on the worker's stderr; import noise dropped as the
    build's CLI drops it, unless `optforge --verbose`)."""
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    quiet_imports(verbose=not quiet)
    return run_job(job, say, say)


class DaskExecutor:
    concurrent = True

    def __init__(self, address: Optional[str], device: str, log: Callable[[str], None]):
        self.address, self.device, self.log = address, device, log
        self.own_cache = address is not None  # workers elsewhere: entries travel through the remote
        self.cluster = self.client = None
        self.futures: dict = {}  # future -> stage name
        self.finished: queue.SimpleQueue = queue.SimpleQueue()  # futures, as they finish (their callbacks)
        self.interrupted = False  # Ctrl-C seen (`_on_sigint`); `wait` raises it, else `close`
        self._raised = False  # that KeyboardInterrupt has been raised
        self._sigint = None  # the SIGINT handler before start(), while ours is installed

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: at once, wherever it lands
            raise KeyboardInterrupt
        self.interrupted = True

    def start(self, needs: dict[str, dict[str, int]]) -> None:
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            self._sigint = signal.signal(signal.SIGINT, self._on_sigint)
        if self.address is not None:
            try:
                # Dask's connect timeout (30 s; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT sets it)
                self.client = distributed.Client(self.address,
                                                 timeout=dask.config.get("distributed.comm.timeouts.connect"))
            except (OSError, TimeoutError, ValueError) as e:
                raise ExecutorError(f"cannot reach the Dask scheduler at {self.address} ({one_line(e)}): start "
                                    "one (`dask scheduler`, then `dask worker ADDRESS` on each machine) or leave "
                                    "out --address for a local cluster") from None
            where = f"the Dask cluster at {self.address}"
        else:
            self.cluster = self._local_cluster()
            self.client = distributed.Client(self.cluster)
            where = "the local Dask cluster"
        try:
            info = self.client.scheduler_info(n_workers=-1)  # newer releases list 5 workers unless told
        except TypeError:
            info = self.client.scheduler_info()
        workers = info["workers"].values()
        if not workers:
            raise ExecutorError(f"{where} has no worker: start one with `dask worker {self.address}`")
        missing = missing_resources({s: n for s, n in needs.items() if n}, [w.get("resources") or {} for w in workers])
        if missing is not None:
            stage, need = missing
            asked = ",".join(f"{r}={n}" for r, n in need.items())
            raise ExecutorError(f"no worker of {where} offers {asked}, which {stage} asks for: start "
                                f"`dask worker ADDRESS --resources \"{asked}\"` (cpu_bench: one worker per "
                                "machine; GPU: one worker per GPU)")

    def _local_cluster(self):
        dask.config.set({"distributed.nanny.pre-spawn-environ": SPAWN_ENVIRON})
        gpus = visible_gpus() if self.device == "cuda" else []
        workers = {name: {"cls": distributed.Nanny,
                          "options": {"nthreads": 1, "memory_limit": 0, "host": "127.0.0.1",
                                      "silence_logs": logging.ERROR, "preload": [__name__], **spec}}
                   for name, spec in local_workers(self.device, os.cpu_count() or 1, gpus).items()}
        scheduler = {"cls": distributed.Scheduler,
                     "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": None}}
        return distributed.SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR,
                                       name="optforge")

    def submit(self, job: StageJob) -> None:
        future = self.client.submit(_work, job, quieted(), key=f"{job.name}-{uuid.uuid4().hex[:12]}", pure=False,
                                    resources=job.resources or None, retries=0)
        self.futures[future] = job.name
        future.add_done_callback(self.finished.put)

    def wait(self) -> list[Attempt]:
        done = []
        while not done:
            if self.interrupted:
                self._raised = True
                raise KeyboardInterrupt
            with contextlib.suppress(queue.Empty):
                done.append(self.finished.get(timeout=0.1))
        while not self.finished.empty():
            done.append(self.finished.get())
        attempts = []
        for future in done:
            name = self.futures.pop(future)
            try:
                attempts.append(future.result())
            except OptforgeError:
                raise  # what stops a local build too (a device torch cannot see, a cache it cannot write)
            except Exception as e:  # noqa: BLE001 -- the worker died (KilledWorker), or lost its scheduler
                attempts.append(Attempt(name, "crashed", reason=f"its Dask worker failed: "
                                                                f"{type(e).__name__}: {one_line(e)}"))
        return attempts

    def close(self) -> None:
        if self._sigint is not None:  # Ctrl-C is the build's again (a KeyboardInterrupt) once we stop
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None
        if self.client is not None:
            if self.futures:
                self.client.cancel(list(self.futures))
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None
        if self.interrupted and not self._raised:  # Ctrl-C after the last wait(): still an interrupted build
            self._raised = True
            raise KeyboardInterrupt
