"""Progress of long loops off a terminal (optforge/progress.py) and the factory that picks tqdm or lines
(optforge/run.py): a fake clock and a StringIO, so every line is exact (no sleeping, no timing)."""

from __future__ import annotations

import io
import os
import re

import pytest

from optforge.errors import OptforgeError
from optforge.progress import (DEFAULT_INTERVAL_S, ENV_INTERVAL, LineProgress, fmt_duration, fmt_rate,
                               interval_from_env)
from optforge.progress import stage_progress
from optforge.stages.base import StageContext


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def teacher_bar(clock, out, interval=30.0, total=2105):
    return LineProgress(total=total, desc="teacher finetune", prefix="  [teacher] ", file=out,
                        interval=interval, clock=clock)


def test_a_line_every_interval_with_rate_eta_and_postfix_then_the_totals_at_close():
    clock, out = Clock(), io.StringIO()
    bar = teacher_bar(clock, out)
    for step in range(1, 421):  # 4 steps/s, 32 examples per step
        clock.t = step * 0.25
        bar.set_postfix({"ex/s": 128.0, "loss": f"{1 / step:.4f}"})
        bar.update(1)
    assert lines(out) == [
        "  [teacher] teacher finetune: step 120/2105 (6%), 4.0 steps/s, 128 ex/s, loss 0.0083, "
        "elapsed 30s, ETA 8m16s",
        "  [teacher] teacher finetune: step 240/2105 (11%), 4.0 steps/s, 128 ex/s, loss 0.0042, "
        "elapsed 1m00s, ETA 7m46s",
        "  [teacher] teacher finetune: step 360/2105 (17%), 4.0 steps/s, 128 ex/s, loss 0.0028, "
        "elapsed 1m30s, ETA 7m16s",
    ]
    clock.t = 105.0
    bar.set_postfix({"ex/s": 128.0, "loss": "0.3121"})
    clock.t = 120.0  # a step that took 15 s: the line comes at the first update after the interval
    bar.update(0)
    assert lines(out)[-1] == ("  [teacher] teacher finetune: step 420/2105 (20%), 3.5 steps/s, 128 ex/s, "
                              "loss 0.3121, elapsed 2m00s, ETA 8m01s")
    bar.update(2105 - 420)
    clock.t = 526.25
    bar.close()
    bar.close()  # closing twice prints once
    assert lines(out)[-1] == ("  [teacher] teacher finetune: done: 2105 steps in 8m46s, 4.0 steps/s, "
                              "128 ex/s, loss 0.3121")
    assert len(lines(out)) == 5


def test_the_first_line_waits_a_whole_interval_and_a_short_loop_prints_nothing():
    clock, out = Clock(100.0), io.StringIO()  # the clock's zero is not the loop's
    with teacher_bar(clock, out, total=10) as bar:
        for _ in range(10):
            clock.t += 2.9
            bar.update()
    assert lines(out) == []  # 29 s: under one interval, and the stage's own line says how it went


def test_iterating_counts_items_and_a_zero_interval_reports_every_step():
    clock, out = Clock(), io.StringIO()
    seen = []
    for item in LineProgress(["a", "b"], desc="evaluate", unit="example", prefix="  [evaluate:x] ", file=out,
                             interval=0, clock=clock):
        clock.t += 0.5
        seen.append(item)
    assert seen == ["a", "b"]
    assert lines(out) == [
        "  [evaluate:x] evaluate: example 1/2 (50%), 2.0 examples/s, elapsed 0.5s, ETA 0.5s",
        "  [evaluate:x] evaluate: example 2/2 (100%), 2.0 examples/s, elapsed 1.0s, ETA 0.0s",
        "  [evaluate:x] evaluate: done: 2 examples in 1.0s, 2.0 examples/s",
    ]


def test_unknown_total_and_no_step_yet():
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(desc="warm-up", file=out, interval=10, clock=clock)
    clock.t = 10
    bar.update(0)
    clock.t = 20
    bar.update(5)
    assert lines(out) == ["warm-up: step 0, elapsed 10s", "warm-up: step 5, 0.25 steps/s, elapsed 20s"]


def test_a_loop_left_by_an_exception_says_where_it_stopped():
    clock, out = Clock(), io.StringIO()
    with pytest.raises(KeyError):
        with teacher_bar(clock, out, total=100) as bar:
            clock.t = 40
            bar.update(10)
            raise KeyError("boom")
    assert lines(out)[-1] == "  [teacher] teacher finetune: stopped at step 10/100 (10%) after 40s, 0.25 steps/s"


@pytest.mark.parametrize("seconds, text", [(0, "0.0s"), (4.25, "4.2s"), (9.96, "10s"), (59.4, "59s"),
                                           (59.6, "1m00s"), (105, "1m45s"), (421.25, "7m01s"),
                                           (870, "14m30s"), (3599.6, "1h00m"), (7385, "2h03m")])
def test_durations(seconds, text):
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [(0.254, "0.25"), (4.0, "4.0"), (12.34, "12.3"), (128.4, "128"),
                                        (99.96, "100")])
def test_rates(rate, text):
    assert fmt_rate(rate) == text


@pytest.mark.parametrize("value, seconds", [(None, DEFAULT_INTERVAL_S), ("", DEFAULT_INTERVAL_S), ("5", 5.0),
                                            (" 0.01 ", 0.01), ("0", 0.0)])
def test_interval_from_the_environment(value, seconds):
    env = {} if value is None else {ENV_INTERVAL: value}
    assert interval_from_env(env) == seconds


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", "1e999", "30s"])
def test_a_bad_interval_is_a_clear_error(value):
    with pytest.raises(OptforgeError) as e:
        interval_from_env({ENV_INTERVAL: value})
    assert str(e.value) == (f"{ENV_INTERVAL}={value!r}: not a number of seconds between progress lines "
                            "(a finite number >= 0, e.g. 30 or 0.5)")


# --------------------------------------------------------------------------- run.py's factory


def test_off_a_terminal_the_stage_gets_progress_lines():
    clock, out = Clock(), io.StringIO()
    ctx = StageContext(name="distill", kind="distill", params=None, inputs={}, input_metrics={}, out=None,
                       device="cpu", progress=stage_progress("distill", file=out, interval=1.0, clock=clock))
    bar = ctx.bar(total=8, desc="distill: teacher logits", unit="example")
    assert isinstance(bar, LineProgress)
    clock.t = 1.0
    bar.update(4)
    assert lines(out) == ["  [distill] distill: teacher logits: example 4/8 (50%), 4.0 examples/s, "
                          "elapsed 1.0s, ETA 1.0s"]
    unnamed = ctx.bar(range(2))  # no desc: the stage's name says what it is
    clock.t = 3.0
    assert list(unnamed) == [0, 1]
    assert lines(out)[-2:] == ["  [distill] distill: step 1/2 (50%), 0.50 steps/s, elapsed 2.0s, ETA 2.0s",
                               "  [distill] distill: done: 2 steps in 2.0s, 1.0 steps/s"]


def test_on_a_terminal_the_stage_gets_a_tqdm_bar():
    from tqdm import tqdm

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal:
        assert terminal.isatty()
        bar = stage_progress("teacher", file=terminal, interval=1.0)(total=3, desc="teacher finetune")
        try:
            assert isinstance(bar, tqdm) and not isinstance(bar, LineProgress)
            assert bar.desc.startswith("teacher teacher finetune")
        finally:
            bar.close()
    os.close(master)


def test_a_build_off_a_terminal_prints_progress_lines(tmp_path, monkeypatch, capsys, fake_kinds):
    """execute(progress=True), the CLI's default, on the fake stages (each iterates ctx.bar(range(3)))."""
    from optforge.run import build

    monkeypatch.setenv("OPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(ENV_INTERVAL, "0")
    monkeypatch.chdir(tmp_path)
    toy = fake_kinds.write_toy(tmp_path / "recipes")
    result = build(toy, device="cpu", echo=lambda s: None, render_report=False)
    assert result.exit_code == 0
    err = capsys.readouterr().err.splitlines()
    teacher = [line for line in err if line.startswith("  [teacher] ")]
    steps = [re.fullmatch(r"  \[teacher\] steps: step (\d)/3 \((\d+)%\)(, \S+ steps/s)?, elapsed \S+(, ETA \S+)?", line)
             for line in teacher[:-1]]
    assert [(m[1], m[2]) for m in steps] == [("1", "33"), ("2", "67"), ("3", "100")], teacher
    assert re.fullmatch(r"  \[teacher\] steps: done: 3 steps in \S+(, \S+ steps/s)?", teacher[-1]), teacher
    assert sum(": done: 3 steps in " in line for line in err) == len(result.ran) == 21  # one per stage


def test_a_bad_interval_stops_the_build_before_it_starts(cli, optforge_env, fake_kinds):
    toy = fake_kinds.write_toy(optforge_env.root / "recipes")
    result = cli("build", toy, "--device", "cpu", env={ENV_INTERVAL: "soon"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {ENV_INTERVAL}='soon': not a number of seconds between progress "
                                          "lines (a finite number >= 0, e.g. 30 or 0.5)"]
    assert not (toy.with_suffix(".lock")).exists()  # nothing ran
