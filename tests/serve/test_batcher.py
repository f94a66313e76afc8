"""DynamicBatcher on plain Python callables: grouping, routing, failures, cancellation, the queue bound.

No timing thresholds: where order matters, a gate (threading.Event) holds the running batch so the
test decides what is queued when. Every await is bounded by `within`, so a bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from optforge.serve.batcher import BatchFailed, Closed, DynamicBatcher, Overloaded

BOUND_S = 10.0


async def within(aw, seconds: float = BOUND_S):
    return await asyncio.wait_for(aw, seconds)


def run(coro):
    return asyncio.run(within(coro, 60))


class FakeModel:
    """Records each batch; "boom" in a batch raises; `gate` (when set up) holds a batch until opened."""

    def __init__(self, gated: bool = False):
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.started = threading.Event()  # a batch is inside the function
        if not gated:
            self.gate.set()

    def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.started.set()
        if not self.gate.wait(BOUND_S):
            raise RuntimeError("gate never opened")
        if "boom" in payloads:
            raise ValueError("model exploded")
        return [f"r:{p}" for p in payloads], {"forward": 1.0}


async def wait_started(model: FakeModel):
    """Until a batch is inside the model (polled from the loop; bounded)."""
    for _ in range(int(BOUND_S / 0.005)):
        if model.started.is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no batch started")


def test_groups_up_to_max_batch():
    async def main():
        model = FakeModel()
        async with DynamicBatcher(model, max_batch=4, max_wait_ms=60_000, max_queue=64) as b:
            outs = await within(asyncio.gather(*(b.submit([i]) for i in range(8))))
        assert [o.results for o in outs] == [[f"r:{i}"] for i in range(8)]
        # a full batch goes at once: the 60 s window is never waited out (within() would fail first)
        assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert all(o.batch_sizes == (4,) for o in outs)

    run(main())


def test_groups_within_the_window_and_sends_a_lone_request_after_it():
    async def main():
        model = FakeModel()
        async with DynamicBatcher(model, max_batch=100, max_wait_ms=20, max_queue=1000) as b:
            outs = await within(asyncio.gather(b.submit(["a"]), b.submit(["b"]), b.submit(["c"])))
            assert model.batches == [["a", "b", "c"]]
            assert [o.results for o in outs] == [["r:a"], ["r:b"], ["r:c"]]
            lone = await within(b.submit(["d"]))  # batch never fills: the window closes it
            assert lone.results == ["r:d"] and lone.batch_sizes == (1,)
            assert lone.queue_ms >= 0 and lone.timings == {"forward": 1.0}

    run(main())


def test_arrivals_after_the_window_closed_go_in_the_next_batch():
    async def main():
        model = FakeModel(gated=True)
        async with DynamicBatcher(model, max_batch=100, max_wait_ms=5, max_queue=1000) as b:
            first = asyncio.ensure_future(b.submit(["a"]))
            await wait_started(model)  # a's window closed and its batch is running
            later = [asyncio.ensure_future(b.submit([x])) for x in "bcd"]
            await asyncio.sleep(0)
            assert b.pending == 3
            model.gate.set()
            await within(asyncio.gather(first, *later))
        # b, c, d queued while a ran: their window had passed when the worker got free -> one batch
        assert model.batches == [["a"], ["b", "c", "d"]]

    run(main())


def test_results_are_routed_to_each_caller_in_order_across_batches():
    async def main():
        model = FakeModel()
        async with DynamicBatcher(model, max_batch=3, max_wait_ms=1, max_queue=100) as b:
            jobs = [["x1", "x2", "x3", "x4", "x5"], ["y1"], ["z1", "z2"]]
            outs = await within(asyncio.gather(*(b.submit(j) for j in jobs)))
        for job, out in zip(jobs, outs):
            assert out.results == [f"r:{p}" for p in job]
        assert all(len(batch) <= 3 for batch in model.batches)
        assert sorted(p for batch in model.batches for p in batch) == sorted(p for j in jobs for p in j)
        assert outs[0].batch_sizes == (3, 3)  # x1-x3, then x4 x5 y1

    run(main())


def test_a_failing_forward_answers_every_waiting_caller_and_the_worker_goes_on():
    async def main():
        model = FakeModel()
        async with DynamicBatcher(model, max_batch=8, max_wait_ms=5, max_queue=100) as b:
            outs = await within(asyncio.gather(b.submit(["a"]), b.submit(["boom"]), b.submit(["c", "d"]),
                                               return_exceptions=True))
            assert all(isinstance(o, BatchFailed) for o in outs), outs
            assert "model exploded" in str(outs[0]) and isinstance(outs[0].__cause__, ValueError)
            again = await within(b.submit(["e"]))
            assert again.results == ["r:e"]

    run(main())


def test_a_failure_drops_the_rest_of_a_spanning_request():
    async def main():
        model = FakeModel()
        async with DynamicBatcher(model, max_batch=2, max_wait_ms=1, max_queue=100) as b:
            with pytest.raises(BatchFailed):
                await within(b.submit(["boom", "x", "y", "z"]))
            await within(b.submit(["after"]))
            assert b.pending == 0
        assert ["y", "z"] not in model.batches  # the failed caller's queued items never ran

    run(main())


def test_a_cancelled_caller_is_dropped_without_breaking_the_batch():
    async def main():
        model = FakeModel(gated=True)
        async with DynamicBatcher(model, max_batch=4, max_wait_ms=5, max_queue=100) as b:
            running = asyncio.ensure_future(b.submit(["r1"]))
            gone_running = asyncio.ensure_future(b.submit(["r2"]))
            await wait_started(model)  # r1, r2 are in the running batch
            queued_gone = asyncio.ensure_future(b.submit(["q1", "q2"]))
            queued_kept = asyncio.ensure_future(b.submit(["q3"]))
            await asyncio.sleep(0)
            assert b.pending == 3
            queued_gone.cancel()
            gone_running.cancel()
            await asyncio.sleep(0)
            assert b.pending == 1  # the cancelled caller's slots are free at once
            model.gate.set()
            assert (await within(running)).results == ["r:r1"]
            assert (await within(queued_kept)).results == ["r:q3"]
            for t in (queued_gone, gone_running):
                with pytest.raises(asyncio.CancelledError):
                    await t
        assert model.batches == [["r1", "r2"], ["q3"]]

    run(main())


def test_a_full_queue_rejects_at_once_and_recovers():
    async def main():
        model = FakeModel(gated=True)
        async with DynamicBatcher(model, max_batch=2, max_wait_ms=1, max_queue=4) as b:
            first = asyncio.ensure_future(b.submit(["a", "b"]))
            await wait_started(model)
            queued = [asyncio.ensure_future(b.submit([x, x])) for x in "cd"]
            await asyncio.sleep(0)
            assert b.pending == 4
            with pytest.raises(Overloaded):
                await within(b.submit(["e"]))
            model.gate.set()
            await within(asyncio.gather(first, *queued))
            assert (await within(b.submit(["f"]))).results == ["r:f"]

    run(main())


def test_stop_fails_waiting_callers_with_closed():
    async def main():
        model = FakeModel(gated=True)
        b = DynamicBatcher(model, max_batch=1, max_wait_ms=1, max_queue=10)
        await b.start()
        running = asyncio.ensure_future(b.submit(["a"]))
        await wait_started(model)
        waiting = asyncio.ensure_future(b.submit(["b"]))
        await asyncio.sleep(0)
        await within(b.stop())
        model.gate.set()
        for t in (running, waiting):
            with pytest.raises(Closed):
                await within(t)
        with pytest.raises(Closed):
            await b.submit(["c"])

    run(main())


def test_a_wrong_number_of_results_is_a_batch_failure():
    async def main():
        async with DynamicBatcher(lambda xs: (xs[:-1], {}), max_batch=4, max_wait_ms=1, max_queue=10) as b:
            with pytest.raises(BatchFailed, match="returned 1 results for 2"):
                await within(b.submit(["a", "b"]))

    run(main())


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        DynamicBatcher(FakeModel(), max_batch=0, max_wait_ms=1, max_queue=10)
    with pytest.raises(ValueError):
        DynamicBatcher(FakeModel(), max_batch=8, max_wait_ms=1, max_queue=4)

    async def main():
        async with DynamicBatcher(FakeModel(), max_batch=2, max_wait_ms=1, max_queue=4) as b:
            with pytest.raises(ValueError):
                await b.submit([])

    run(main())
