"""uvicorn's h11 protocol with the guards uvicorn 0.54 lacks, for clients that hold a connection without
finishing a request.

- **Header timeout.** uvicorn arms no timer when a connection opens, and disarms its keep-alive timer at
  the first byte of a request: a client that connects and says nothing, or trickles a request head one
  byte at a time, holds a socket (a file descriptor) forever. Here a connection is closed when a
  complete request head has not arrived `header_timeout_s` after it opened, or after the first byte of
  a later request on a kept-alive connection (a deadline, not an idle timer: trickling does not reset
  it). The body has its own deadline, in the app (`create_app(body_timeout_s=...)`), which can answer 408.
- **Connection cap at accept.** uvicorn's `limit_concurrency` answers 503 only once a request head
  arrives, so idle connections beyond the cap would still each hold a descriptor. Here a connection
  that would make `limit_concurrency` open connections is answered 503 and closed at once (the server
  sets it to its connection cap + 1, so uvicorn's own check at the request head never fires).
- **A body that breaks HTTP framing** (a malformed chunk): uvicorn answers 400 and closes, and the app,
  still reading the body, sees only a disconnect. Here the request's scope says so first, under
  `scope["extensions"][MALFORMED_BODY]`, so the app counts a client error, not a vanished client.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from optforge.serve.app import MALFORMED_BODY
from optforge.serve.guards import OVER_LIMIT, REFUSED


class GuardedH11Protocol(H11Protocol):
    """Pass as `uvicorn.Config(http=functools.partial(GuardedH11Protocol, header_timeout_s=...))`."""

    def __init__(self, *args, header_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # uvicorn's own test (this connection counted), applied at accept instead of at the request head
        if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:
            self.logger.warning(OVER_LIMIT)
            transport.write(REFUSED)
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or the connection is done)
            self._disarm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and not self.cycle.response_started:
            # the app has this request's head and waits for its body, which broke the framing
            self.cycle.scope.setdefault("extensions", {})[MALFORMED_BODY] = msg
        super().send_400_response(msg)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.timeout_keep_alive_handler()  # what uvicorn does with an idle kept-alive connection: close
