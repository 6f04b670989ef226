"""uvicorn's HTTP/1.1 (h11) protocol with the service's limits on connections.

Against clients that hold the server without asking anything: a connection's request head (request line
and headers) must arrive within `request_read_s` of its connection or of its first byte after a
keep-alive pause, else the connection is closed; beyond `max_connections` open connections a new one is
answered 503 and closed. A malformed request line or header is answered with the service's JSON error
instead of uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from malex.serve.errors import raw_error_response

log = logging.getLogger("malex.serve")


class LimitedH11Protocol(H11Protocol):
    """One connection: uvicorn's h11 protocol plus a request-head timeout, a connection cap and JSON 400s."""

    def __init__(self, *args, request_read_s: float, max_connections: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.request_read_s = request_read_s
        self.max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def factory(cls, request_read_s: float, max_connections: int):
        """The protocol class with its limits bound, for `uvicorn.Config(http=...)`."""
        return functools.partial(cls, request_read_s=request_read_s, max_connections=max_connections)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d are open (at most %d)", len(self.connections) - 1,
                        self.max_connections)
            transport.write(raw_error_response(
                503, "Service Unavailable", "too_many_connections",
                f"{len(self.connections) - 1} connections are open; at most {self.max_connections} are served "
                "at once, retry shortly", {"retry-after": "1"}))
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_head_timer()  # a request head has started (or not yet) and is still incomplete
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._disarm_head_timer()
        self.transport.write(raw_error_response(
            400, "Bad Request", "bad_request", f"the request line or a header is malformed ({msg.rstrip('.')}); "
            "expected an HTTP/1.1 request: 'METHOD /path HTTP/1.1', then 'Name: value' header lines"))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.request_read_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            log.info("closed a connection whose request head did not arrive within %g s", self.request_read_s)
            self.transport.close()
