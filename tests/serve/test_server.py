"""The server under abusive clients: idle connections, slow headers, a file-descriptor limit.

The server runs in a child process (its own RLIMIT_NOFILE of 64, like a small container) with a plain
Python batch function, so no model loads. Every socket has a timeout, every loop a bound in count and
time; nothing leaves 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from optforge.serve.app import create_app
from optforge.serve.guards import RateLimitedLines, default_max_connections
from optforge.serve.server import LOOPBACK, ServerThread

LINUX = sys.platform.startswith("linux")

HEADER_TIMEOUT_S = 1.0
FD_LIMIT = 64
IDLE, SLOW = 80, 20

CHILD = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, ({fd_limit}, {fd_limit}))
    from optforge.serve.app import create_app
    from optforge.serve.server import serve_forever

    app = create_app(lambda texts: ([{{"label": 0}} for _ in texts], {{}}), max_batch=4)
    serve_forever(app, "127.0.0.1", 0, log_level="info", header_timeout_s={header_timeout_s},
                  on_ready=lambda host, port: print(json.dumps({{"port": port}}), flush=True))
""")


@pytest.fixture
def limited_server(tmp_path):
    if not LINUX:
        pytest.skip("RLIMIT_NOFILE and EMFILE as Linux has them")
    """(port, path of the child's stderr): a server with 64 file descriptors and a 1 s header timeout."""
    log_path = tmp_path / "server.log"
    code = CHILD.format(fd_limit=FD_LIMIT, header_timeout_s=HEADER_TIMEOUT_S)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = proc.stdout.readline()  # the child prints its port once bound, or exits
        assert line, f"the server did not start: {log_path.read_text(errors='replace')[-2000:]}"
        yield json.loads(line)["port"], log_path
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def healthz_status(port: int, timeout: float) -> int | None:
    """The status of one GET /healthz on a fresh connection, None if it got no answer in `timeout`."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except OSError:  # timeout, reset, refused
        return None
    finally:
        conn.close()


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """True when the server closed this connection (EOF or reset), reading whatever it sent first;
    False when it is still open at `deadline` (time.monotonic())."""
    try:
        for _ in range(64):  # a closing server sends at most a short response before its EOF
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(4096):
                return True
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_idle_and_slow_header_clients_cannot_starve_the_server(limited_server):
    port, log_path = limited_server
    sockets: list[socket.socket] = []
    try:
        idle = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(IDLE)]
        sockets += idle
        slow = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(SLOW)]
        sockets += slow
        # slow-header clients trickle one byte of a never-ending head every 0.2 s: a server that only
        # times out *silence* would hold them forever; the head must be complete within the timeout
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        alive = set(range(SLOW))
        trickle_until = time.monotonic() + HEADER_TIMEOUT_S * 4
        i = 0
        while alive and time.monotonic() < trickle_until and i < len(head):
            for j in sorted(alive):
                try:
                    slow[j].sendall(head[i:i + 1])
                except OSError:  # the server closed it: what we want
                    alive.discard(j)
            i += 1
            time.sleep(0.2)
        assert not alive, f"{len(alive)} slow-header clients still connected after {HEADER_TIMEOUT_S * 4:g} s"

        # a normal client is answered within a bounded time (a 503 while the cap is full is an answer,
        # but once the abusers are cut off it must get through)
        deadline = time.monotonic() + 20
        statuses = []
        while time.monotonic() < deadline and 200 not in statuses and len(statuses) < 200:
            statuses.append(healthz_status(port, timeout=3))
            time.sleep(0.1)
        assert 200 in statuses, f"/healthz never answered 200 within 20 s: {statuses}"

        # every idle and slow connection was closed by the server (header timeout or connection cap)
        deadline = time.monotonic() + HEADER_TIMEOUT_S * 5
        still_open = sum(not closed_by_server(s, deadline) for s in idle + slow)
        assert still_open == 0, f"{still_open} of {IDLE + SLOW} abusive connections still open"
    finally:
        for s in sockets:
            s.close()
    log = log_path.read_bytes()
    assert len(log.splitlines()) < 100 and len(log) < 50_000, log[-3000:].decode(errors="replace")
    assert b"Traceback" not in log


# --------------------------------------------------------------------------- each guard on its own


def echo_app(**kwargs):
    return create_app(lambda texts: ([{"label": 0} for _ in texts], {}), max_batch=4, **kwargs)


def test_a_kept_alive_connection_must_finish_its_next_head_in_time():
    with ServerThread(echo_app(), header_timeout_s=0.5) as server:
        with socket.create_connection((LOOPBACK, server.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            # kept alive (its idle timeout is 30 s); the next head starts and never ends
            s.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            t0 = time.monotonic()
            assert closed_by_server(s, t0 + 5)
            assert time.monotonic() - t0 < 5


def test_connections_beyond_the_cap_are_refused_at_once_and_the_rest_served():
    with ServerThread(echo_app(), header_timeout_s=30, max_connections=3) as server:
        held = [socket.create_connection((LOOPBACK, server.port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.2)  # the server has accepted them
            with socket.create_connection((LOOPBACK, server.port), timeout=10) as extra:
                answer = extra.recv(4096)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower()
            held.pop().close()
            deadline = time.monotonic() + 10
            status = None
            while status != 200 and time.monotonic() < deadline:
                status = healthz_status(server.port, timeout=5)
                time.sleep(0.05)
            assert status == 200
        finally:
            for s in held:
                s.close()


def test_default_connection_cap_follows_the_descriptor_limit():
    assert default_max_connections(fd_limit=64, fds_in_use=12) == 64 - 12 - 32
    assert default_max_connections(fd_limit=20, fds_in_use=12) == 1  # never 0: the server still serves
    assert default_max_connections(fd_limit=1 << 20, fds_in_use=12) == 1024
    assert 1 <= default_max_connections() <= 1024


def make_record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, (),
                             (type(exc), exc, None) if exc else None)


def test_flood_lines_pass_once_per_period_with_a_count():
    now = [100.0]
    f = RateLimitedLines(["socket.accept() out of system resource"], every_s=10, clock=lambda: now[0])
    flood = "socket.accept() out of system resource\nsocket: <asyncio.TransportSocket fd=3>"
    first = make_record(flood, OSError(24, "Too many open files"))
    assert f.filter(first) and first.getMessage() == ("socket.accept() out of system resource: "
                                                      "[Errno 24] Too many open files")
    assert first.exc_info is None  # no traceback
    for _ in range(5000):
        now[0] += 0.001
        assert not f.filter(make_record(flood, OSError(24, "Too many open files")))
    now[0] = 111.0
    later = make_record(flood)
    assert f.filter(later) and later.getMessage().endswith("(5000 more in the last 11 s not shown)")
    other = make_record("Task was destroyed but it is pending!")
    assert all(f.filter(other) for _ in range(3))
