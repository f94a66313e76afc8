"""Progress of a long loop (training steps, a teacher's logits, evaluation) where no terminal shows a bar.

On a terminal a stage's `ctx.bar(...)` is a tqdm bar (`stage_progress` below picks). In a log (CI,
`nohup`, a pipe) a bar prints nothing useful, so `LineProgress` prints one line every `interval` seconds
instead:

    [teacher] teacher finetune: step 420/2105 (20%), 4.0 steps/s, 128 ex/s, loss 0.3121, elapsed 1m45s, ETA 7m01s

what the loop is, where it is (with the percent when the total is known), its rate and what the loop
reported through `set_postfix` (a key ending in `/s` is a rate: `128 ex/s`; others read `loss 0.3121`),
the time since it started, and the time left at its average rate so far. The first line comes one
interval after the loop started, and a last one when it closes, with the totals (`done: ...`, or
`stopped at ...` when it ended early); a loop shorter than one interval prints nothing (the stage's own
line says how it went). Lines are written from `update`: a line is due at the first update after the
interval. `OPTFORGE_PROGRESS_INTERVAL` (seconds; default 30) sets the interval for a build.

It is tqdm-compatible where the stages use it (`update`, `set_postfix`, `close`, a context manager,
iteration) and pure: the clock and the stream are injected, so tests run on a fake clock.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Iterable, Mapping, Optional, TextIO

from optforge.errors import OptforgeError

DEFAULT_INTERVAL_S = 30.0
ENV_INTERVAL = "OPTFORGE_PROGRESS_INTERVAL"


def interval_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds between progress lines: $OPTFORGE_PROGRESS_INTERVAL (unset or empty: 30), a finite number
    >= 0 (0: a line at every update), else an OptforgeError naming the value."""
    raw = environ.get(ENV_INTERVAL, "")
    if not raw.strip():
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise OptforgeError(f"{ENV_INTERVAL}={raw!r}: not a number of seconds between progress lines "
                            "(a finite number >= 0, e.g. 30 or 0.5)")
    return seconds


def fmt_duration(seconds: float) -> str:
    """4.2s, 42s, 7m01s, 2h03m: as precise as a person reading a log wants it."""
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def fmt_rate(per_s: float) -> str:
    """0.25, 4.0, 12.3, 128: three significant digits at most, no more than one decimal above 1."""
    if per_s >= 99.95:
        return f"{per_s:.0f}"
    if per_s >= 0.995:
        return f"{per_s:.1f}"
    return f"{per_s:.2f}"


def _postfix_item(key: str, value) -> str:
    if key.endswith("/s"):
        return f"{fmt_rate(value) if isinstance(value, (int, float)) else value} {key}"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return f"{key} {value}"


class LineProgress:
    """A progress line every `interval` seconds on `file` (see the module docstring); tqdm's calling
    conventions: `LineProgress(iterable=None, total=None, desc="", unit="step")`."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "step", *, prefix: str = "", file: Optional[TextIO] = None,
                 interval: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.prefix, self.file, self.interval, self.clock = prefix, file or sys.stderr, interval, clock
        self.n = 0
        self.postfix: dict = {}
        self.start = self.last_line = clock()
        self.printed = self.closed = False

    # ------------------------------------------------------------------ tqdm's interface

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_line >= self.interval:
            self._write(self._progress(now))
            self.last_line = now

    def set_postfix(self, ordered_dict: Optional[Mapping] = None, refresh: bool = True, **kwargs) -> None:
        """What the loop knows besides its count (`{"ex/s": 128.0, "loss": "0.3121"}`), shown in the next line."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        if self.printed or now - self.start >= self.interval:
            self._write(self._totals(now))

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    # ------------------------------------------------------------------ the lines

    def _rate(self, elapsed: float) -> Optional[float]:
        return self.n / elapsed if self.n and elapsed > 0 else None

    def _tail(self, rate: Optional[float]) -> list[str]:
        """The rates and the loop's postfix."""
        parts = [f"{fmt_rate(rate)} {self.unit}s/s"] if rate is not None else []
        return parts + [_postfix_item(k, v) for k, v in self.postfix.items()]

    def _where(self) -> str:
        if not self.total:
            return f"{self.unit} {self.n}"
        pct = round(100 * self.n / self.total)
        if self.n < self.total:
            pct = min(pct, 99)
        return f"{self.unit} {self.n}/{self.total} ({pct}%)"

    def _progress(self, now: float) -> str:
        elapsed = now - self.start
        rate = self._rate(elapsed)
        parts = [self._where(), *self._tail(rate), f"elapsed {fmt_duration(elapsed)}"]
        if rate is not None and self.total:
            parts.append(f"ETA {fmt_duration(max(self.total - self.n, 0) / rate)}")
        return ", ".join(parts)

    def _totals(self, now: float) -> str:
        elapsed = now - self.start
        if self.total and self.n < self.total:
            head = f"stopped at {self._where()} after {fmt_duration(elapsed)}"
        else:
            head = f"done: {self.n} {self.unit}s in {fmt_duration(elapsed)}"
        return ", ".join([head, *self._tail(self._rate(elapsed))])

    def _write(self, text: str) -> None:
        label = self.desc or "progress"
        print(f"{self.prefix}{label}: {text}", file=self.file, flush=True)
        self.printed = True


def stage_progress(stage: str, file: Optional[TextIO] = None, interval: float = DEFAULT_INTERVAL_S,
                   clock: Callable[[], float] = time.monotonic, bars: bool = True) -> Callable:
    """StageContext.progress for stage `stage`: on a terminal a tqdm bar (shown only after a second);
    elsewhere (a log, a pipe) a progress line every `interval` seconds (optforge.progress.LineProgress).
    `file`: where it goes (sys.stderr, as it is when a bar starts). `bars=False`: lines even on a terminal
    (stages running side by side in Dask workers would draw their bars over each other)."""

    def progress(iterable=None, total=None, desc: str = "", unit: str = "step"):
        stream = file or sys.stderr
        if bars and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            return tqdm(iterable=iterable, total=total, desc=f"{stage} {desc}".strip(), unit=unit, file=stream,
                        leave=False, delay=1.0, dynamic_ncols=True)
        return LineProgress(iterable, total, desc or stage, unit, prefix=f"  [{stage}] ", file=stream,
                            interval=interval, clock=clock)

    return progress
