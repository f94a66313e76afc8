"""uvicorn on a socket we bind ourselves: in a background thread (`ServerThread`, tests and tools), in
the foreground (`serve_forever`, the CLI), or as a child process (`python -m optforge.serve.server`,
the serve_benchmark stage: its own interpreter, so the load generator does not share its GIL).

Every way in binds with `bind` and builds its uvicorn server with `_server`, which set the guards
against clients that hold connections: uvicorn's h11 protocol with a header timeout and a connection
cap at accept (serve/protocol.py), a cap derived from the file-descriptor limit so that the limit is
never what refuses a client, a listening socket that sheds waiting clients should the descriptors run
out all the same, and one log line per 10 s (with a count) for the messages a flood of clients repeats
(serve/guards.py). The body's deadline is the app's (`create_app(body_timeout_s=...)`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import threading
import time

from optforge.serve.guards import SheddingSocket, default_max_connections, limit_flood_logging
from optforge.serve.options import DEFAULT_HEADER_TIMEOUT_S, checked

LOOPBACK = "127.0.0.1"


def bind(host: str = LOOPBACK, port: int = 0) -> socket.socket:
    """A listening TCP socket; port 0 picks a free port (no probe-then-bind race).

    proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    and without it a response written in two pieces (headers, then body) waits for the client's delayed
    ACK -- ~40 ms added to every request. A SheddingSocket: out of file descriptors, it closes waiting
    clients instead of handing asyncio the EMFILE."""
    sock = SheddingSocket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server(app, log_level: str, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
            max_connections: int | None = None):
    """The uvicorn server for `app`, with the guards (see the module's doc)."""
    import uvicorn

    from optforge.serve.protocol import GuardedH11Protocol

    header_timeout_s = checked("header_timeout_s", header_timeout_s)
    max_connections = checked("max_connections", max_connections if max_connections is not None
                              else default_max_connections())
    # keep-alive longer than any pause of the load generator; no access log (it costs per request);
    # limit_concurrency counts the connection being judged, so cap + 1 lets `max_connections` stay open
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_keep_alive=30,
                            timeout_graceful_shutdown=5, limit_concurrency=max_connections + 1,
                            http=functools.partial(GuardedH11Protocol, header_timeout_s=header_timeout_s))
    limit_flood_logging()  # after Config, which configures uvicorn's loggers
    return uvicorn.Server(config)


class ServerThread:
    """`with ServerThread(app) as s: ... s.port ...` -- uvicorn in a daemon thread on 127.0.0.1."""

    def __init__(self, app, host: str = LOOPBACK, port: int = 0, log_level: str = "warning",
                 header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, max_connections: int | None = None):
        self.server = _server(app, log_level, header_timeout_s, max_connections)
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.thread = threading.Thread(target=self._run, name="optforge-uvicorn", daemon=True)
        self.error: BaseException | None = None

    def _run(self):
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self.error = e

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"server failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start within {timeout:.0f}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_forever(app, host: str, port: int, log_level: str = "info", on_ready=None,
                  header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, max_connections: int | None = None) -> None:
    """Foreground server (Ctrl-C stops it). `on_ready(host, port)` is called once the socket is bound.
    `max_connections` defaults to `default_max_connections()`, counted here, after the model loaded."""
    server = _server(app, log_level, header_timeout_s, max_connections)
    sock = bind(host, port)
    if on_ready is not None:
        on_ready(*sock.getsockname()[:2])
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def main(argv=None) -> int:
    """Child-process entry point for the serve_benchmark stage: loads an artifact, serves it on
    127.0.0.1 (only), prints one JSON line {"port": N} on stdout once the socket is bound."""
    p = argparse.ArgumentParser(prog="python -m optforge.serve.server")
    p.add_argument("--artifact", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--config", default="")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=None)
    args = p.parse_args(argv)

    from optforge.serve.app import create_app
    from optforge.serve.model import load_for_serving

    import torch

    runnable, run = load_for_serving(args.artifact, args.device, args.precision)
    info = {"config": args.config, "model": runnable.description, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    app = create_app(run, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                     info=info)

    def ready(host, port):
        print(json.dumps({"port": port}), flush=True)

    serve_forever(app, LOOPBACK, 0, log_level="warning", on_ready=ready)
    return 0


if __name__ == "__main__":
    from optforge.procs import die_with_parent

    die_with_parent()  # a SIGKILLed build takes its serving child with it
    sys.exit(main())
