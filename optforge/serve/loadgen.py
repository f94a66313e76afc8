"""An open-loop load generator: Poisson arrivals at an offered rate, to 127.0.0.1 only.

Open loop means a request is sent at its scheduled time whether or not earlier ones have been
answered, and its latency is measured from that *scheduled* time -- a slow server cannot slow the
generator down and hide its own queueing (no coordinated omission). Every run is bounded: at most
`max_requests` arrivals within `duration_s`, each request abandoned after `timeout_s`, so a run ends
within duration_s + timeout_s whatever the server does.

The HTTP/1.1 client is a few lines over asyncio streams (keep-alive connections, Content-Length or
chunked bodies): cheaper per request than a general client, which matters when the generator shares
two cores with the server it measures.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from optforge.bench import mean, percentile

LOOPBACK = "127.0.0.1"
PHASES = ("queue", "tokenize", "forward", "postprocess", "serialize", "total")


def check_loopback(host: str) -> None:
    if host != LOOPBACK:
        raise ValueError(f"the load generator only sends to {LOOPBACK}, not {host!r}")


def poisson_arrivals(rate: float, duration_s: float, max_requests: int, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process of `rate` per second, cut at
    `duration_s` and at `max_requests` arrivals. Same seed, same schedule."""
    if rate <= 0 or duration_s <= 0 or max_requests < 0:
        raise ValueError(f"need rate > 0, duration_s > 0, max_requests >= 0 (got {rate}, {duration_s}, "
                         f"{max_requests})")
    rng = random.Random(seed)
    out, t = [], 0.0
    while len(out) < max_requests:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        out.append(t)
    return out


# --------------------------------------------------------------------------- HTTP/1.1 client


class HttpError(Exception):
    pass


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)


class Connection:
    MAX_HEADER = 64 * 1024
    MAX_BODY = 16 * 1024 * 1024

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.used = False

    @classmethod
    async def open(cls, host: str, port: int) -> "Connection":
        check_loopback(host)
        reader, writer = await asyncio.open_connection(host, port, limit=cls.MAX_HEADER)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None
                      ) -> tuple[HttpResponse, bool]:
        """(response, keep_alive)."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        self.used = True
        status_line = await self.reader.readline()
        if not status_line:
            raise HttpError("connection closed before a response")
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = await self._chunked()
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if n > self.MAX_BODY:
                raise HttpError(f"response body of {n} bytes is over the client's limit")
            data = await self.reader.readexactly(n)
        else:
            data = await self.reader.read(self.MAX_BODY)
            headers["connection"] = "close"
        keep = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
        return HttpResponse(status, headers, data), keep

    async def _chunked(self) -> bytes:
        chunks = []
        while True:
            size = int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        self.writer.close()


class Client:
    """A pool of keep-alive connections to one loopback port; at most `max_connections` open, so a
    burst waits for a connection (that wait counts in its latency) instead of exhausting sockets."""

    def __init__(self, port: int, host: str = LOOPBACK, max_connections: int = 256):
        check_loopback(host)
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.slots = asyncio.Semaphore(max_connections)

    async def request(self, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None
                      ) -> HttpResponse:
        async with self.slots:
            for attempt in range(2):
                conn = self.idle.pop() if self.idle else await Connection.open(self.host, self.port)
                reused = conn.used
                try:
                    resp, keep = await conn.request(method, path, body, headers)
                except (HttpError, ConnectionError, asyncio.IncompleteReadError):
                    conn.close()
                    if reused and attempt == 0:  # the server closed an idle keep-alive connection
                        continue
                    raise
                except BaseException:
                    conn.close()  # cancelled mid-request: the connection is in an unknown state
                    raise
                if keep:
                    self.idle.append(conn)
                else:
                    conn.close()
                return resp
        raise AssertionError("unreachable")

    async def post_json(self, path: str, doc) -> HttpResponse:
        return await self.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    async def get(self, path: str) -> HttpResponse:
        return await self.request("GET", path)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


# --------------------------------------------------------------------------- one load run


@dataclass
class RequestRecord:
    scheduled_s: float  # arrival time from the run's start
    latency_ms: Optional[float]  # scheduled arrival -> response read; None when it never came
    status: Optional[int]  # HTTP status; None: connection error or timeout
    outcome: str  # ok | rejected (503) | error | timeout
    phases: dict = field(default_factory=dict)  # Server-Timing, ms
    batch_sizes: tuple = ()


@dataclass
class LoadRun:
    offered_rps: float
    duration_s: float
    records: list[RequestRecord]
    elapsed_s: float  # the schedule's window, or longer when responses came after it ended
    window_s: float = 0.0  # duration_s, or the last arrival when max_requests cut the schedule short


async def run_load(port: int, texts: Sequence[str], rate: float, duration_s: float, max_requests: int,
                   seed: int = 0, *, timeout_s: float = 10.0, max_connections: int = 256,
                   host: str = LOOPBACK, client: Optional[Client] = None) -> LoadRun:
    """Offer `rate` requests/s of POST /predict {"text": ...} (texts drawn with `seed`) for at most
    `duration_s` seconds and `max_requests` requests. Ends within duration_s + timeout_s + a little."""
    from optforge.serve.app import parse_server_timing

    check_loopback(host)
    if not texts:
        raise ValueError("no texts to send")
    arrivals = poisson_arrivals(rate, duration_s, max_requests, seed)
    pick = random.Random(seed + 1)
    bodies = [json.dumps({"text": texts[pick.randrange(len(texts))]}).encode() for _ in arrivals]
    own = client is None
    client = client or Client(port, host, max_connections)
    loop = asyncio.get_running_loop()
    records: list[Optional[RequestRecord]] = [None] * len(arrivals)
    last_done = [0.0]

    async def one(i: int, due: float) -> None:
        rec = RequestRecord(arrivals[i], None, None, "timeout")
        records[i] = rec
        try:
            resp = await asyncio.wait_for(
                client.request("POST", "/predict", bodies[i], {"Content-Type": "application/json"}),
                max(due + timeout_s - loop.time(), 0.001))
        except (TimeoutError, asyncio.TimeoutError):
            return
        except (OSError, HttpError, asyncio.IncompleteReadError, ValueError):
            rec.outcome = "error"
            return
        now = loop.time()
        last_done[0] = max(last_done[0], now)
        rec.status, rec.latency_ms = resp.status, (now - due) * 1000.0
        if resp.status == 200:
            rec.outcome = "ok"
            rec.phases = parse_server_timing(resp.headers.get("server-timing", ""))
            sizes = resp.headers.get("x-batch-size", "")
            rec.batch_sizes = tuple(int(s) for s in sizes.split(",") if s.strip().isdigit())
        else:
            rec.outcome = "rejected" if resp.status == 503 else "error"

    start = loop.time() + 0.01
    tasks = []
    try:
        for i, at in enumerate(arrivals):
            due = start + at
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, due)))  # behind schedule: send at once (open loop)
        if tasks:
            # every request has its own deadline; this outer bound only guards against a bug
            _, pending = await asyncio.wait(tasks, timeout=timeout_s + 5.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
        if own:
            client.close()
    window = arrivals[-1] if arrivals and len(arrivals) >= max_requests else duration_s
    end = max(last_done[0], start + window)
    if any(r is not None and r.outcome == "timeout" for r in records):
        end = max(end, loop.time())
    return LoadRun(rate, duration_s, [r for r in records if r is not None], max(end - start, 1e-9), window)


# --------------------------------------------------------------------------- summary (pure)


def percentile_counting_failures(ok_ms: Sequence[float], failures: int, q: float) -> Optional[float]:
    """The q-th percentile of all requests where each failure counts as infinitely slow; None when
    that percentile falls among the failures."""
    n = len(ok_ms) + failures
    if n == 0:
        return None
    xs = sorted(ok_ms)
    pos = q / 100 * (n - 1)
    lo = math.floor(pos)
    frac = pos - lo
    if lo >= len(xs) or (frac > 0 and lo + 1 >= len(xs)):
        return None
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def summarize(run: LoadRun, slo_p99_ms: float, max_batch: int) -> dict:
    """One entry of serving.runs. p50/p90/p99 are over answered requests; `p99_all_ms` counts
    rejected, failed and timed-out requests as infinitely slow (None when more than ~1% failed), and
    the SLO is met when that p99 is within `slo_p99_ms`."""
    ok = [r for r in run.records if r.outcome == "ok"]
    lat = [r.latency_ms for r in ok]
    failures = len(run.records) - len(ok)
    p99_all = percentile_counting_failures(lat, failures, 99)
    breakdown = {}
    for phase in PHASES:
        vals = [r.phases[phase] for r in ok if phase in r.phases]
        if vals:
            breakdown[phase] = _r(mean(vals))
    if lat and "total" in breakdown:
        # what the server did not see: connection wait, client and network time, event-loop delays
        breakdown["outside_server"] = _r(max(mean(lat) - breakdown["total"], 0.0))
    sizes = [b for r in ok for b in r.batch_sizes]
    return {
        "max_batch": max_batch,
        "offered_rps": _r(run.offered_rps),
        # what the Poisson draw actually sent per second of its window (short runs: +-1/sqrt(n))
        "arrival_rps": _r(len(run.records) / run.window_s) if run.window_s > 0 else None,
        "achieved_rps": _r(len(ok) / run.elapsed_s),
        "duration_s": _r(run.elapsed_s),
        "sent": len(run.records),
        "ok": len(ok),
        "rejected": sum(r.outcome == "rejected" for r in run.records),
        "errors": sum(r.outcome == "error" for r in run.records),
        "timeouts": sum(r.outcome == "timeout" for r in run.records),
        "p50_ms": _r(percentile(lat, 50)) if lat else None,
        "p90_ms": _r(percentile(lat, 90)) if lat else None,
        "p99_ms": _r(percentile(lat, 99)) if lat else None,
        "p99_all_ms": _r(p99_all),
        "meets_slo": p99_all is not None and p99_all <= slo_p99_ms,
        "mean_batch_size": _r(mean(sizes)) if sizes else None,
        "breakdown_ms": breakdown,
    }


def max_rps_under_slo(runs: Sequence[dict]) -> float:
    """The highest achieved throughput among runs that met the SLO (0.0 when none did)."""
    return max((r["achieved_rps"] for r in runs if r["meets_slo"]), default=0.0)


def _r(x: Optional[float], nd: int = 3) -> Optional[float]:
    return None if x is None else round(float(x), nd)
