"""Pure timing statistics: exact values on known series."""

from __future__ import annotations

import math

import pytest

from optforge import bench, device, hardware

MS_1_TO_100 = [float(i) for i in range(1, 101)]


def test_percentiles_by_linear_interpolation_like_numpy():
    # index q/100 * (n-1): p50 -> 49.5 -> between 50 and 51; p90 -> 89.1; p99 -> 98.01
    assert bench.percentile(MS_1_TO_100, 50) == 50.5
    assert bench.percentile(MS_1_TO_100, 90) == pytest.approx(90.1, abs=1e-12)
    assert bench.percentile(MS_1_TO_100, 99) == pytest.approx(99.01, abs=1e-12)
    assert bench.percentile(MS_1_TO_100, 0) == 1.0 and bench.percentile(MS_1_TO_100, 100) == 100.0
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter
    assert bench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


def test_mean_std_cv():
    xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # mean 5, population std 2
    assert bench.mean(xs) == 5.0 and bench.std(xs) == 2.0 and bench.cv(xs) == 0.4
    assert bench.cv([3.0, 3.0, 3.0]) == 0.0
    assert bench.std(MS_1_TO_100) == pytest.approx(math.sqrt((100**2 - 1) / 12))


def test_summarize_in_milliseconds():
    s = bench.summarize([x / 1000 for x in MS_1_TO_100], batch_size=32)
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert s["mean"] == pytest.approx(50.5) and s["runs"] == 100
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(100.0)
    assert s["cv"] == pytest.approx(math.sqrt((100**2 - 1) / 12) / 50.5)
    assert s["throughput"] == pytest.approx(32 / 0.0505)  # batch / p50
    assert s["throughput_mean"] == pytest.approx(32 / 0.0505)  # here mean == p50
    assert s["pct_peak"] is None


def test_spread_is_the_iqr_over_the_median():
    # index q/100 * (n-1): p25 -> 24.75 -> 25.75; p75 -> 74.25 -> 75.25; p50 50.5
    s = bench.summarize([x / 1000 for x in MS_1_TO_100], batch_size=1)
    assert s["p25"] == pytest.approx(25.75) and s["p75"] == pytest.approx(75.25)
    assert s["spread"] == pytest.approx(49.5 / 50.5)
    assert bench.spread(MS_1_TO_100) == 49.5 / 50.5
    assert bench.spread([3.0, 3.0, 3.0]) == 0.0 and bench.spread([0.0, 0.0, 1.0]) == 0.0  # p50 0 -> 0
    with pytest.raises(ValueError):
        bench.spread([])


def test_spread_ignores_a_few_outliers_that_cv_does_not():
    # sub-millisecond calls with two host-scheduling stalls: p25 0.21, p50 0.22, p75 0.23
    ms = [0.20, 0.20, 0.21, 0.21, 0.22, 0.22, 0.23, 0.23, 0.23, 1.0, 1.2]
    s = bench.summarize([x / 1000 for x in ms], batch_size=1)
    assert s["p25"] == pytest.approx(0.21) and s["p50"] == pytest.approx(0.22) and s["p75"] == pytest.approx(0.23)
    assert s["spread"] == pytest.approx(1 / 11)  # 0.02 / 0.22: under a 10% gate
    assert s["cv"] == pytest.approx(bench.cv(ms)) and s["cv"] > 0.8  # std / mean: far over it


def test_speedup_and_throughput():
    assert bench.speedup(10.0, 4.0) == 2.5
    assert bench.speedup(4.0, 10.0) == 0.4
    assert bench.speedup(None, 1.0) is None and bench.speedup(1.0, 0.0) is None
    assert bench.throughput(32, 0.016) == 2000.0
    with pytest.raises(ValueError):
        bench.throughput(1, 0.0)


def test_pct_of_peak():
    assert bench.pct_of_peak(1e12, 0.01, 1e15) == pytest.approx(10.0)
    assert bench.pct_of_peak(None, 0.01, 1e15) is None
    assert bench.pct_of_peak(1e12, 0.01, None) is None


class FakeClock:
    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        return self.t

    def tick(self):
        self.t += self.step


def test_measure_fills_the_time_box_warm_up_included():
    clock = FakeClock(1 / 64)  # exact in binary: no rounding at the box's edge
    syncs = []
    times, warm = bench.measure(clock.tick, warmup=4, max_seconds=0.5, sync=lambda: syncs.append(1), clock=clock)
    assert warm == 4 / 64
    assert len(times) == 28 and all(t == 1 / 64 for t in times)  # 4 + 28 calls of 1/64 s = the 0.5 s box
    assert clock.t == 0.5
    assert len(syncs) == 4 + 2 * 28  # after every warm-up call, then around every timed call
    stats = bench.summarize(times, 1, min_runs=20)
    assert stats["runs"] == 28 and stats["capped"] is False


def test_a_slow_call_stops_at_the_box_and_is_flagged():
    """The CPU int4 row: 7.5 s a call, a 2 s box, 5 warm-ups and 20 runs asked for. One warm-up call and
    one timed call (15 s), not 25 calls (187 s)."""
    clock = FakeClock(7.5)
    times, warm = bench.measure(clock.tick, warmup=5, max_seconds=2.0, clock=clock)
    assert warm == 7.5 and times == [7.5] and clock.t == 15.0
    stats = bench.summarize(times, 1, min_runs=20)
    assert stats["runs"] == 1 and stats["capped"] is True


def test_warm_up_stops_at_half_the_box_so_timed_calls_get_the_rest():
    clock = FakeClock(0.5)
    times, warm = bench.measure(clock.tick, warmup=5, max_seconds=2.0, clock=clock)
    assert warm == 1.0 and len(times) == 2 and clock.t == 2.0


def test_the_box_always_gets_one_timed_call_and_stops_at_max_runs():
    clock = FakeClock(3.0)
    times, warm = bench.measure(clock.tick, warmup=0, max_seconds=1.0, clock=clock)
    assert warm == 0.0 and times == [3.0]
    clock = FakeClock(1 / 64)
    times, _ = bench.measure(clock.tick, warmup=0, max_seconds=10.0, clock=clock, max_runs=7)
    assert len(times) == 7


def test_capped_is_only_said_when_min_runs_is_known():
    assert "capped" not in bench.summarize([0.001, 0.002], 1)
    assert bench.summarize([0.001, 0.002], 1, min_runs=2)["capped"] is False
    assert bench.summarize([0.001, 0.002], 1, min_runs=3)["capped"] is True


def test_measure_on_the_real_clock_stays_inside_a_small_box():
    calls = []
    times, _ = bench.measure(lambda: calls.append(1), warmup=2, max_seconds=0.005)
    assert times and len(calls) == 2 + len(times)
    assert sum(times) < 0.005 + max(times)


CPUINFO = """processor\t: 0
model name\t: Test CPU
cpu MHz\t\t: 2000.000
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu fma avx2 avx512f avx512_bf16 avx512_vnni

processor\t: 1
model name\t: Test CPU
cpu MHz\t\t: 2500.000
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu fma avx2 avx512f avx512_bf16 avx512_vnni

processor\t: 2
model name\t: Test CPU
cpu MHz\t\t: 2500.000
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu fma avx2 avx512f avx512_bf16 avx512_vnni
"""


def test_cpu_peak_from_cpuinfo():
    info = device.parse_cpuinfo(CPUINFO) | {"kind": "cpu"}
    assert info["name"] == "Test CPU" and info["cores"] == 2 and info["logical_cpus"] == 3 and info["mhz"] == 2500
    # 2 cores x 2.5 GHz x (2 FMA units x 16 lanes x 2 flop)
    assert hardware.peak(info, "fp32")["peak_flops"] == pytest.approx(2 * 2.5e9 * 64)
    assert hardware.peak(info, "fp32", threads=1)["peak_flops"] == pytest.approx(2.5e9 * 64)
    assert hardware.peak(info, "bf16")["peak_flops"] == pytest.approx(2 * 2.5e9 * 128)
    assert hardware.peak(info, "fp16") is None  # no avx512_fp16: unknown, not a guess
    avx2 = info | {"flags": ["fma", "avx2"]}
    assert hardware.peak(avx2, "fp32")["peak_flops"] == pytest.approx(2 * 2.5e9 * 32)
    assert hardware.peak(info | {"flags": []}, "fp32") is None
    assert hardware.peak(info | {"mhz": None}, "fp32") is None


def test_gpu_peaks_by_name():
    h100 = hardware.peak({"kind": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "bf16")
    assert h100["peak_flops"] == pytest.approx(989.4e12) and h100["measured_flops"] == pytest.approx(790e12)
    assert hardware.peak({"kind": "cuda", "name": "NVIDIA H200"}, "fp8")["peak_flops"] == pytest.approx(1978.9e12)
    assert hardware.peak({"kind": "cuda", "name": "NVIDIA H100 PCIe"}, "bf16")["peak_flops"] == pytest.approx(756e12)
    assert hardware.peak({"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, "fp32")["peak_flops"] == pytest.approx(19.5e12)
    assert hardware.peak({"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, "fp8") is None
    assert hardware.peak({"kind": "cuda", "name": "NVIDIA L4"}, "bf16")["peak_flops"] == pytest.approx(121e12)
    assert hardware.peak({"kind": "cuda", "name": "Mystery GPU"}, "bf16") is None
