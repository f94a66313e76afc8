"""A dynamic batcher in plain asyncio (no torch, no HTTP): many callers, one model, one batch at a time.

Each caller submits a list of payloads (the texts of one request). Payloads queue as *items* in arrival
order; the worker takes a batch when either `max_batch` live items are waiting or the oldest waiting
item has waited `max_wait_ms` -- so a lone request waits at most `max_wait_ms`, and items that queued
while the previous batch ran go at once (their window has passed). A request with more texts than
`max_batch` simply spans several batches. The batch function runs in a worker thread (the event loop
keeps accepting and answering requests meanwhile); its results are routed back to each caller in the
caller's order.

Failure rules:
  * the batch function raises -> every caller with an item in that batch gets `BatchFailed`, the
    worker goes on with the next batch; a caller's items still queued are dropped with it.
  * a caller is cancelled (client went away) -> its queued items are dropped and no longer count
    against the queue bound; items of it already running finish and their results are discarded.
  * more than `max_queue` items would be waiting -> `Overloaded` at once (the HTTP layer answers 503):
    memory stays bounded and an overloaded server fails fast instead of answering late.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

# run_batch(payloads) -> (one result per payload, {phase: milliseconds}); runs in a worker thread
BatchFn = Callable[[list], "tuple[list, dict[str, float]]"]


class Overloaded(Exception):
    """The queue is full: the caller should be told to retry later (HTTP 503)."""


class BatchFailed(Exception):
    """The batch function raised; `__cause__` is its exception."""


class Closed(Exception):
    """The batcher was stopped before this caller's items ran."""


@dataclass(frozen=True)
class Outcome:
    results: list  # one per submitted payload, in the caller's order
    queue_ms: float  # longest wait of any of the caller's items, from submit to its batch's start
    batch_sizes: tuple[int, ...]  # the batches its items ran in
    run_ms: float  # wall time of those batches in the worker thread, as seen from the event loop
    timings: dict[str, float]  # per-phase ms reported by the batch function, summed over its batches


@dataclass(eq=False)
class _Job:
    payloads: Sequence
    future: asyncio.Future
    enqueued: float
    results: list
    remaining: int  # items without a result yet
    queued: int  # items still waiting in the queue
    dropped: bool = False  # cancelled or failed: its queued items are skipped
    queue_ms: float = 0.0
    run_ms: float = 0.0
    batch_sizes: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


@dataclass(eq=False)
class _Item:
    job: _Job
    index: int


class DynamicBatcher:
    def __init__(self, run_batch: BatchFn, *, max_batch: int, max_wait_ms: float, max_queue: int,
                 executor: Optional[concurrent.futures.Executor] = None,
                 on_batch: Optional[Callable[[int, float, dict], None]] = None,
                 clock: Callable[[], float] = time.perf_counter):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 <= max_wait_ms < math.inf:  # nan or inf would hold a lone caller forever
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms}")
        if max_queue < max_batch:
            raise ValueError(f"max_queue ({max_queue}) must be >= max_batch ({max_batch})")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # on_batch(size, run_ms, timings), on the event loop, after each batch
        self.clock = clock
        self._executor = executor
        self._own_executor = executor is None
        self._queue: deque[_Item] = deque()
        self._pending = 0  # live items in the queue (what the bound counts)
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._running: list[_Item] = []
        self._closed = False
        self.batches = 0  # batches run so far (tests and /healthz read it)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="optforge-batch")
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="optforge-batcher")

    async def stop(self) -> None:
        """Fail whatever still waits with `Closed`, stop the worker (a running batch's thread is not
        interrupted: its results are discarded)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            self._fail(item.job, Closed("the server is shutting down"))
        self._pending = 0
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def pending(self) -> int:
        """Items waiting for a batch (not counting the one running)."""
        return self._pending

    # ------------------------------------------------------------------ callers

    async def submit(self, payloads: Sequence) -> Outcome:
        n = len(payloads)
        if n == 0:
            raise ValueError("nothing to run: empty list of payloads")
        if self._task is None or self._closed:
            raise Closed("the batcher is not running")
        if self._pending + n > self.max_queue:
            raise Overloaded(f"queue full ({self._pending} waiting, limit {self.max_queue})")
        job = _Job(payloads, asyncio.get_running_loop().create_future(), self.clock(), [None] * n, n, n)
        self._queue.extend(_Item(job, i) for i in range(n))
        self._pending += n
        self._wake.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._drop(job)
            raise

    # ------------------------------------------------------------------ worker

    def _drop(self, job: _Job) -> None:
        if not job.dropped:
            job.dropped = True
            self._pending -= job.queued
            job.queued = 0

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._drop(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _skip_dropped(self) -> None:
        while self._queue and self._queue[0].job.dropped:
            self._queue.popleft()

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if item.job.dropped:
                continue
            item.job.queued -= 1
            self._pending -= 1
            batch.append(item)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._skip_dropped()
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            # the window opens when the oldest live item arrived, not when the worker got free
            deadline = self._queue[0].job.enqueued + self.max_wait_s
            while self._pending < self.max_batch:
                timeout = deadline - self.clock()
                if timeout <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._run(loop, batch)

    async def _run(self, loop, batch: list[_Item]) -> None:
        started = self.clock()
        jobs = list(dict.fromkeys(item.job for item in batch))  # unique, in order
        for job in jobs:
            job.queue_ms = max(job.queue_ms, (started - job.enqueued) * 1000.0)
        self._running = batch
        try:
            values, timings = await loop.run_in_executor(self._executor, self.run_batch,
                                                         [it.job.payloads[it.index] for it in batch])
            if len(values) != len(batch):
                raise RuntimeError(f"batch function returned {len(values)} results for {len(batch)} inputs")
        except asyncio.CancelledError:
            for job in jobs:
                self._fail(job, Closed("the server is shutting down"))
            raise
        except Exception as e:  # noqa: BLE001 - every caller of the batch is told; the worker lives on
            for job in jobs:
                err = BatchFailed(f"{type(e).__name__}: {e}")
                err.__cause__ = e
                self._fail(job, err)
            return
        finally:
            self._running = []
        run_ms = (self.clock() - started) * 1000.0
        self.batches += 1
        timings = dict(timings or {})
        for job in jobs:
            job.batch_sizes.append(len(batch))
            job.run_ms += run_ms
            for k, v in timings.items():
                job.timings[k] = job.timings.get(k, 0.0) + float(v)
        for item, value in zip(batch, values):
            job = item.job
            job.results[item.index] = value
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(Outcome(job.results, job.queue_ms, tuple(job.batch_sizes), job.run_ms,
                                              dict(job.timings)))
        if self.on_batch is not None:
            self.on_batch(len(batch), run_ms, timings)

