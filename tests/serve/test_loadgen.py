"""The open-loop load generator: seeded Poisson schedules, loopback only, bounded runs, the summary."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import threading
import time
from collections import Counter

import pytest

from optforge.serve import loadgen
from optforge.serve.app import create_app
from optforge.serve.loadgen import LoadRun, RequestRecord
from optforge.serve.server import ServerThread

# --------------------------------------------------------------------------- schedule (pure)


def test_poisson_schedule_is_seeded():
    a = loadgen.poisson_arrivals(50, 10, 10_000, seed=3)
    assert a == loadgen.poisson_arrivals(50, 10, 10_000, seed=3)
    assert a != loadgen.poisson_arrivals(50, 10, 10_000, seed=4)
    assert a == sorted(a) and all(0 < t < 10 for t in a)


def test_poisson_inter_arrivals_are_exponential_with_the_offered_rate():
    rate = 40.0
    arrivals = loadgen.poisson_arrivals(rate, 2_000, 1_000_000, seed=0)
    gaps = [b - a for a, b in zip([0.0] + arrivals, arrivals)]
    n = len(gaps)  # ~80,000: the sample statistics below are within a few standard errors
    assert abs(n - rate * 2_000) < 5 * math.sqrt(rate * 2_000)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.02)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.03)  # cv of exp = 1
    # memoryless: P(gap > 1/rate) = e^-1
    assert sum(g > 1 / rate for g in gaps) / n == pytest.approx(math.exp(-1), abs=0.01)
    # counts in 1-second windows are Poisson: variance equals mean
    counts = [0] * 2_000
    for t in arrivals:
        counts[int(t)] += 1
    assert statistics.pvariance(counts) / statistics.fmean(counts) == pytest.approx(1.0, rel=0.1)


def test_schedule_is_bounded_in_count_and_in_time():
    assert len(loadgen.poisson_arrivals(1000, 10, 50, seed=1)) == 50
    short = loadgen.poisson_arrivals(10, 1.0, 10_000, seed=1)
    assert len(short) == 11 and max(short) == pytest.approx(0.95856, abs=1e-5)  # seed 1: 11 arrivals in 1 s
    assert loadgen.poisson_arrivals(10, 1.0, 0, seed=1) == []
    with pytest.raises(ValueError):
        loadgen.poisson_arrivals(0, 1.0, 10, seed=1)


@pytest.mark.parametrize("host", ["0.0.0.0", "localhost", "10.0.0.1", "::1", "example.com"])
def test_only_loopback(host):
    with pytest.raises(ValueError, match="127.0.0.1"):
        loadgen.check_loopback(host)

    async def main():
        with pytest.raises(ValueError, match="127.0.0.1"):
            await loadgen.run_load(1, ["x"], 10, 0.1, 1, host=host)

    asyncio.run(main())


# --------------------------------------------------------------------------- summary (pure)


def _run(latencies, outcomes=None, rate=100.0, elapsed=1.0, phases=None):
    outcomes = outcomes or ["ok"] * len(latencies)
    recs = [RequestRecord(i / 100, lat if o == "ok" else None, 200 if o == "ok" else 503, o,
                          dict(phases or {}), (2,) if o == "ok" else ())
            for i, (lat, o) in enumerate(zip(latencies, outcomes))]
    return LoadRun(rate, elapsed, recs, elapsed, elapsed)


def test_summary_counts_and_percentiles():
    lat = [float(i) for i in range(1, 101)]  # 1..100 ms
    s = loadgen.summarize(_run(lat, phases={"queue": 1.0, "forward": 2.0, "total": 4.0}), slo_p99_ms=100,
                          max_batch=8)
    assert (s["sent"], s["ok"], s["rejected"], s["errors"], s["timeouts"]) == (100, 100, 0, 0, 0)
    assert s["p50_ms"] == 50.5 and s["p99_ms"] == pytest.approx(99.01) and s["p99_all_ms"] == s["p99_ms"]
    assert s["meets_slo"] and s["achieved_rps"] == 100.0 and s["arrival_rps"] == 100.0 and s["max_batch"] == 8
    assert s["breakdown_ms"] == {"queue": 1.0, "forward": 2.0, "total": 4.0, "outside_server": 46.5}
    assert s["mean_batch_size"] == 2.0
    json.dumps(s, allow_nan=False)


def test_failures_count_as_infinitely_slow_for_the_slo():
    lat = [1.0] * 95 + [0.0] * 5
    s = loadgen.summarize(_run(lat, ["ok"] * 95 + ["rejected"] * 5), slo_p99_ms=50, max_batch=1)
    assert s["p99_ms"] == 1.0  # the answered ones were fast...
    assert s["p99_all_ms"] is None and not s["meets_slo"]  # ...but 5% got no answer
    assert s["rejected"] == 5
    json.dumps(s, allow_nan=False)


def test_percentile_counting_failures():
    f = loadgen.percentile_counting_failures
    assert f([1.0, 2.0, 3.0], 0, 50) == 2.0
    assert f([1.0] * 999, 1, 99) == 1.0  # 0.1% failures stay above the 99th percentile
    assert f([1.0] * 98, 2, 99) is None
    assert f([], 3, 50) is None and f([], 0, 50) is None


def test_max_rps_under_slo():
    runs = [{"achieved_rps": 10.0, "meets_slo": True}, {"achieved_rps": 48.0, "meets_slo": True},
            {"achieved_rps": 60.0, "meets_slo": False}]
    assert loadgen.max_rps_under_slo(runs) == 48.0
    assert loadgen.max_rps_under_slo([{"achieved_rps": 5.0, "meets_slo": False}]) == 0.0


# --------------------------------------------------------------------------- against a real server


def fast_model(texts):
    return [{"label": 0, "label_name": "neg", "probabilities": [1.0, 0.0]} for _ in texts], {"forward": 0.1}


def test_a_run_sends_its_schedule_and_reads_server_timings():
    with ServerThread(create_app(fast_model, max_batch=4, max_wait_ms=1)) as server:
        run = asyncio.run(asyncio.wait_for(
            loadgen.run_load(server.port, ["a", "b b"], rate=100, duration_s=0.5, max_requests=30, seed=2), 60))
    expected = loadgen.poisson_arrivals(100, 0.5, 30, seed=2)
    assert [r.scheduled_s for r in run.records] == expected
    assert all(r.outcome == "ok" and r.status == 200 and r.latency_ms >= 0 for r in run.records)
    assert all({"queue", "forward", "serialize", "total"} <= set(r.phases) for r in run.records)
    assert all(1 <= b <= 4 for r in run.records for b in r.batch_sizes)
    s = loadgen.summarize(run, slo_p99_ms=1e6, max_batch=4)
    assert s["sent"] == s["ok"] == len(expected) and s["achieved_rps"] > 0


def test_a_run_ends_by_itself_when_the_server_never_answers():
    gate = threading.Event()

    def stuck(texts):
        gate.wait(30)
        return fast_model(texts)

    # seed 0 at 50/s: 12 arrivals, all within the first 0.24 s, so max_requests=12 cuts the schedule
    expected = loadgen.poisson_arrivals(50, 0.4, 12, seed=0)
    assert len(expected) == 12 and max(expected) < 0.25
    with ServerThread(create_app(stuck, max_batch=1, max_wait_ms=1, max_queue=4)) as server:
        t0 = time.monotonic()
        try:
            run = asyncio.run(asyncio.wait_for(
                loadgen.run_load(server.port, ["x"], rate=50, duration_s=0.4, max_requests=12, seed=0,
                                 timeout_s=1.0), 60))
        finally:
            gate.set()
        took = time.monotonic() - t0
    assert [r.scheduled_s for r in run.records] == expected
    # the server holds 1 request in the stuck batch + max_queue=4 waiting: those 5 time out (none is
    # answered, and every arrival comes before the first timeout at 1 s), the other 7 get a 503 at once
    assert Counter(r.outcome for r in run.records) == {"timeout": 5, "rejected": 7}
    # the bound is part of the contract (duration + per-request timeout), not a speed claim
    assert took < 0.4 + 1.0 + 10
    s = loadgen.summarize(run, slo_p99_ms=50, max_batch=1)
    assert s["ok"] == 0 and s["p50_ms"] is None and not s["meets_slo"] and s["achieved_rps"] == 0.0
