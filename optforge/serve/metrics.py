"""Prometheus text exposition (format 0.0.4) for the server's counters and histograms. Pure, no I/O.

Updated only from the event loop thread, so no locks. Label values are escaped as the format says
(backslash, double quote, newline); metric and label names are ours and checked once.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# seconds: 0.5 ms .. 10 s (a batch-size-1 forward of a small model is ~1 ms on CPU)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def escape_label_value(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    return repr(float(v))


def _labels(names: Sequence[str], values: Sequence, extra: str = "") -> str:
    parts = [f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def size_buckets(max_batch: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to and including max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(float(b))
        b *= 2
    out.append(float(max_batch))
    return tuple(out)


class _Metric:
    type = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        for label in labelnames:
            if not _LABEL.match(label) or label == "le":
                raise ValueError(f"bad label name {label!r}")
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.type}"]


class Counter(_Metric):
    type = "counter"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self.values: dict[tuple, float] = {} if labelnames else {(): 0.0}  # an unlabelled series exists at 0

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}"
                                for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    """A value read when the page is rendered (e.g. the queue length)."""

    type = "gauge"

    def __init__(self, name, help, read):
        super().__init__(name, help)
        self.read = read

    def lines(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(float(self.read()))}"]


class Histogram(_Metric):
    type = "histogram"

    def __init__(self, name, help, buckets: Iterable[float], labelnames=()):
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if not self.buckets or len(set(self.buckets)) != len(self.buckets):
            raise ValueError(f"{name}: buckets must be non-empty and distinct")
        self.series: dict[tuple, list] = {}  # key -> [counts per bucket (non-cumulative) + overflow, sum]
        if not self.labelnames:
            self.series[()] = [[0] * (len(self.buckets) + 1), 0.0]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [[0] * (len(self.buckets) + 1), 0.0]
        i = next((j for j, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        s[0][i] += 1
        s[1] += value

    def count(self, **labels) -> int:
        s = self.series.get(self._key(labels))
        return sum(s[0]) if s else 0

    def lines(self) -> list[str]:
        out = self.header()
        for key, (counts, total) in sorted(self.series.items()):
            acc = 0
            for b, c in zip(self.buckets + (math.inf,), counts):
                acc += c
                le = 'le="' + _fmt(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {acc}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_fmt(total)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {acc}")
        return out


class Registry:
    def __init__(self):
        self.metrics: list[_Metric] = []

    def add(self, metric):
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name!r} registered twice")
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines += m.lines()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """What /metrics shows for one server."""

    def __init__(self, max_batch: int, queue_length=lambda: 0):
        r = self.registry = Registry()
        self.requests = r.add(Counter("optforge_requests_total", "HTTP requests by path and status code.",
                                      ("path", "code")))
        self.texts = r.add(Counter("optforge_texts_total", "Texts classified."))
        self.batches = r.add(Histogram("optforge_batch_size", "Texts per model forward pass.",
                                       size_buckets(max_batch)))
        self.latency = r.add(Histogram("optforge_request_latency_seconds",
                                       "Time from request received to response ready, /predict only.",
                                       LATENCY_BUCKETS))
        self.phase = r.add(Histogram("optforge_phase_seconds",
                                     "Per-request time by phase (queue, tokenize, forward, postprocess, "
                                     "serialize).", LATENCY_BUCKETS, ("phase",)))
        self.queue = r.add(Gauge("optforge_queue_length", "Texts waiting for a batch.", queue_length))

    def render(self) -> str:
        return self.registry.render()
