"""Guards of the server against clients that hold connections, which need no uvicorn (the h11 protocol
with a header timeout and a connection cap at accept is in serve/protocol.py):

- `default_max_connections`: the connection cap, from the file-descriptor limit, so that running out
  of descriptors is never what refuses a client.
- `SheddingSocket`: a listening socket that, should the process run out of descriptors all the same (a
  burst accepted within one event-loop tick), closes the waiting clients itself. Handed the EMFILE,
  asyncio's accept loop logs a traceback and schedules a retry for each of up to `backlog` (2048)
  attempts per tick; the retries fire together a second later and do it again: hundreds of thousands of
  lines and timers that grow every second (issue 12).
- `RateLimitedLines` on asyncio's and uvicorn's loggers: one line per 10 s, with a count, for each
  message that a flood of clients makes them repeat.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

FD_MARGIN = 32  # descriptors kept free for what the server opens besides connections (model files, logs)
MAX_DEFAULT_CONNECTIONS = 1024
OVER_LIMIT = "Exceeded concurrency limit."  # uvicorn's own words for its 503, so one filter covers both
OUT_OF_FDS = "Out of file descriptors"
_REFUSED_BODY = b"server at its connection limit; retry later\n"
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
           b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
           % (len(_REFUSED_BODY), _REFUSED_BODY))
SHED_AT_MOST = 4096  # clients closed in one go (the kernel's accept queue is at most somaxconn anyway)


def default_max_connections(fd_limit: int | None = None, fds_in_use: int | None = None) -> int:
    """The connection cap: what the soft RLIMIT_NOFILE leaves after the descriptors already open and a
    margin, at most MAX_DEFAULT_CONNECTIONS, at least 1."""
    if fd_limit is None:
        import resource

        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if fd_limit == resource.RLIM_INFINITY:
            fd_limit = MAX_DEFAULT_CONNECTIONS + FD_MARGIN
    if fds_in_use is None:
        try:
            fds_in_use = len(os.listdir("/proc/self/fd"))
        except OSError:  # no /proc (not Linux): assume as many as the margin
            fds_in_use = FD_MARGIN
    return max(1, min(MAX_DEFAULT_CONNECTIONS, fd_limit - fds_in_use - FD_MARGIN))


class RateLimitedLines(logging.Filter):
    """Lets a record that starts with one of `prefixes` through at most once per `every_s` (per prefix),
    saying how many were suppressed since, as one line: its first, the exception's text, no traceback.
    Others pass untouched."""

    def __init__(self, prefixes, every_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.prefixes, self.every_s, self.clock = tuple(prefixes), every_s, clock
        self._last: dict[str, tuple[float, int]] = {}  # prefix -> (when it last passed, suppressed since)
        self._lock = threading.Lock()  # servers in threads share the loggers

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in self.prefixes if message.startswith(p)), None)
        if prefix is None:
            return True
        now = self.clock()
        with self._lock:
            last = self._last.get(prefix)
            if last is not None and now - last[0] < self.every_s:
                self._last[prefix] = (last[0], last[1] + 1)
                return False
            self._last[prefix] = (now, 0)
        exc = record.exc_info[1] if record.exc_info else None
        text = message.splitlines()[0] + (f": {exc}" if exc is not None else "")
        if last is not None and last[1]:
            text += f" ({last[1]} more in the last {now - last[0]:.0f} s not shown)"
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        return True


# what a flood of bad clients makes asyncio and uvicorn log once per client, or (accept() at the
# descriptor limit) thousands of times a second, each with a traceback
FLOOD_LINES = {"asyncio": ("socket.accept() out of system resource",),
               "uvicorn.error": (OVER_LIMIT, "Invalid HTTP request received.", OUT_OF_FDS)}
FLOOD_FILTER = RateLimitedLines([p for ps in FLOOD_LINES.values() for p in ps])


def limit_flood_logging() -> None:
    """Install the flood filter on asyncio's and uvicorn's loggers (once, whatever the number of servers)."""
    for name in FLOOD_LINES:
        logger = logging.getLogger(name)
        if FLOOD_FILTER not in logger.filters:
            logger.addFilter(FLOOD_FILTER)


class SheddingSocket(socket.socket):
    """A listening socket whose `accept()`, out of file descriptors (EMFILE/ENFILE), answers the waiting
    clients 503 and closes them, then reports "nothing waiting" (BlockingIOError) instead of raising
    the EMFILE into asyncio. A spare descriptor is held for this: released, it lets one waiting
    connection at a time be accepted and closed; it is taken again afterwards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._spare = _open_spare()

    def accept(self):
        try:
            return super().accept()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or self._spare is None:
                raise
        shed = self._shed()
        logging.getLogger("uvicorn.error").warning(f"{OUT_OF_FDS}: closed {shed} waiting connection(s)")
        raise BlockingIOError(errno.EAGAIN, "out of file descriptors; waiting connections were closed")

    def _shed(self) -> int:
        os.close(self._spare)
        self._spare = None
        shed = 0
        try:
            while shed < SHED_AT_MOST:
                try:
                    fd, _ = self._accept()
                except OSError:  # none left waiting (or the freed descriptor went to another thread)
                    break
                try:
                    os.write(fd, REFUSED)  # a fresh socket's send buffer takes it whole
                except OSError:
                    pass
                finally:
                    os.close(fd)
                shed += 1
        finally:
            self._spare = _open_spare()
        return shed

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        super().close()


def _open_spare():
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:  # none to spare: EMFILE then goes to asyncio as it would without this class
        return None
