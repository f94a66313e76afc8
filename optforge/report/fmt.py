"""Fixed number formatting for the reports (the same input always prints the same bytes)."""

from __future__ import annotations

from typing import Optional

NA = "n/a"


def ms(x: Optional[float]) -> str:
    if x is None:
        return NA
    if x < 1:
        return f"{x:.3f}"
    if x < 10:
        return f"{x:.2f}"
    if x < 100:
        return f"{x:.1f}"
    return f"{x:.0f}"


def times(x: Optional[float]) -> str:
    return NA if x is None else f"{x:.2f}x"


def speedup(s: Optional[float], lo: Optional[float] = None, hi: Optional[float] = None, d: int = 2) -> str:
    """A paired speedup with its interval: `5.98× (5.71–6.20)`; `5.98×` without one; n/a for None."""
    if s is None:
        return NA
    if lo is None or hi is None:
        return f"{s:.{d}f}×"
    return f"{s:.{d}f}× ({lo:.{d}f}–{hi:.{d}f})"


def pct(x: Optional[float]) -> str:
    """A percentage given in percent (12.3 -> "12.3%")."""
    if x is None:
        return NA
    return f"{x:.2f}%" if abs(x) < 1 else f"{x:.1f}%"


def acc(x: Optional[float]) -> str:
    """Accuracy given as a fraction, printed in percent."""
    return NA if x is None else f"{x * 100:.2f}"


def points(x: Optional[float]) -> str:
    return NA if x is None else f"{x:+.2f}"


def count(n: Optional[int]) -> str:
    if n is None:
        return NA
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def params(total: Optional[int], nonzero: Optional[int]) -> str:
    if total is None:
        return NA
    if nonzero is not None and nonzero < 0.99 * total:
        return f"{count(total)} ({count(nonzero)} non-zero)"
    return count(total)


def size(mb: Optional[float]) -> str:
    if mb is None:
        return NA
    return f"{mb:.2f}" if mb < 10 else f"{mb:.1f}"


def rate(x: Optional[float]) -> str:
    if x is None:
        return NA
    return f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


def flops_rate(x: Optional[float]) -> str:
    """FLOP/s with an SI prefix: 3.32e11 -> "332 GFLOP/s"."""
    if x is None:
        return NA
    for div, unit in ((1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")):
        if x >= div:
            v = x / div
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{x:.0f} FLOP/s"
