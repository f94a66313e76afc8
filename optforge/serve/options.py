"""The ranges of the server's numeric options, checked by one rule wherever they enter: the CLI (before
anything loads), `create_app` and the server. A value outside its range -- `inf`, `nan`, negative, or
absurdly large (a 10 s batching window is a hung request, not batching) -- is refused with a message
that names the option: exit 2 from the CLI, a ValueError from Python. Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from optforge.errors import OptforgeError

DEFAULT_HEADER_TIMEOUT_S = 5.0  # a request head (a few hundred bytes) from connect or from its first byte
DEFAULT_BODY_TIMEOUT_S = 10.0  # the whole body (at most Limits.max_body_bytes, 1 MiB by default)


class ServeOptionError(OptforgeError, ValueError):
    """A server option out of its range (an OptforgeError for the CLI, a ValueError for Python callers)."""


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    unit: str
    above_lo: bool = False  # lo itself is refused (a timeout of 0 would close every connection)
    whole: bool = False  # an integer

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a finite number"
        low = f"> {_num(self.lo)}" if self.above_lo else f">= {_num(self.lo)}"
        return f"{kind} {low} and <= {_num(self.hi)}" + (f" ({self.unit})" if self.unit else "")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


RANGES = {
    "max_wait_ms": Range(0, 10_000, "milliseconds"),
    "header_timeout_s": Range(0, 3600, "seconds", above_lo=True),
    "body_timeout_s": Range(0, 3600, "seconds", above_lo=True),
    "max_connections": Range(1, 1_000_000, "", whole=True),
}


def checked(name: str, value, flag: bool = False):
    """`value` when it is in `RANGES[name]`, else ServeOptionError naming the option as a Python keyword
    (`max_wait_ms`) or, with `flag`, as the CLI spells it (`--max-wait-ms`)."""
    r = RANGES[name]
    shown = "--" + name.replace("_", "-") if flag else name
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and r.whole:
        ok = float(value).is_integer()
    if ok:
        ok = (value > r.lo if r.above_lo else value >= r.lo) and value <= r.hi
    if not ok:
        raise ServeOptionError(f"{shown} must be {r.describe()}, got {value!r}")
    return int(value) if r.whole else float(value)
