"""The frame both inline-SVG charts of the report draw on: plot area, linear or log axes, ticks, grid,
axis titles. Pure: numbers in, SVG text out (the accuracy-vs-latency chart in svg.py, the
latency-vs-load chart in serving.py).

Callers escape what they pass as `aria_label`, `x_title` and `y_title` (markupsafe.escape).
"""

from __future__ import annotations

import math
from typing import Callable

W = 760
LEFT, RIGHT, TOP, BOTTOM = 64, 170, 20, 52


def nice_step(span: float, target: int = 5) -> float:
    """A 1/2/2.5/5 x 10^k step that cuts `span` into about `target` intervals."""
    raw = span / target or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def linear_ticks(lo: float, hi: float) -> list[float]:
    step = nice_step(hi - lo)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k within [lo, hi]."""
    return [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]


def tick_label(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:g}" if v >= 1 else f"{v:.3g}"


def _scale(lo: float, hi: float, log: bool) -> tuple[Callable[[float], float], list[float]]:
    """(value -> fraction of the axis, ticks)."""
    if log:
        a, b = math.log10(lo), math.log10(hi)
        return (lambda v: (math.log10(v) - a) / (b - a)), log_ticks(lo, hi)
    return (lambda v: (v - lo) / (hi - lo)), linear_ticks(lo, hi)


class Axes:
    """The plot area of a W x `height` chart over [x_lo, x_hi] x [y_lo, y_hi], each axis linear or log."""

    def __init__(self, height: int, x: tuple[float, float, bool], y: tuple[float, float, bool]):
        self.height = height
        self.pw, self.ph = W - LEFT - RIGHT, height - TOP - BOTTOM
        self._fx, self.xticks = _scale(*x)
        self._fy, self.yticks = _scale(*y)

    def px(self, v: float) -> float:
        return LEFT + self._fx(v) * self.pw

    def py(self, v: float) -> float:
        return TOP + (1 - self._fy(v)) * self.ph

    def frame(self, aria_label: str, x_title: str, y_title: str,
              y_tick: Callable[[float], str] = tick_label) -> list[str]:
        """The opening <svg> tag, the plot area, grid lines with tick labels, and both axis titles."""
        h, pw, ph = self.height, self.pw, self.ph
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {h}" width="{W}" height="{h}" '
               f'role="img" aria-label="{aria_label}" class="chart">',
               f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fff" stroke="#d0d7de"/>']
        for t in self.xticks:
            x = self.px(t)
            out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#eaeef2"/>'
                       f'<text x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle" class="tick">'
                       f'{tick_label(t)}</text>')
        for t in self.yticks:
            y = self.py(t)
            out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#eaeef2"/>'
                       f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{y_tick(t)}</text>')
        out.append(f'<text x="{LEFT + pw / 2:.1f}" y="{h - 12}" text-anchor="middle" class="axis">{x_title}</text>')
        out.append(f'<text transform="translate(16 {TOP + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
                   f'class="axis">{y_title}</text>')
        return out
