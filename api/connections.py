"""Bounded HTTP connections: a cap on open connections, and a deadline to read each request.

uvicorn (h11) keeps a connection that never sends a request open for ever, and its
``limit_concurrency`` only answers 503 to requests arriving while over the limit (logging a
warning for each), so idle and slow ("slowloris") connections pile up until the process runs
out of file descriptors, and then QMP reconnects fail too. This protocol bounds both:

- At most ``max_connections`` are open. A connection beyond that closes the oldest *idle* one:
  one that waits for a request head (with no bytes of it waiting in the kernel), or is kept
  alive between requests. So a client that sends its request at once is served however many
  idle connections others hold. Only when every other connection is busy with a request is the
  new one closed instead.
- A connection must deliver a whole request (head and body) within ``read_timeout`` of its
  opening or of the first byte of its next request, however slowly it trickles in; between
  requests uvicorn's keep-alive timeout applies.

Each closed connection is counted in ``reclaimd_http_connections_closed_total{reason}``; the log
says so through the repeat limit of ``api.logthrottle``, so a flood never floods the log.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import termios
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from daemon.instruments import HTTP_CONNECTIONS, HTTP_CONNECTIONS_CLOSED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    read_timeout: float


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with :class:`ConnectionLimits`; make one class per server with
    :meth:`with_limits` (the connections of one server are tracked together)."""

    limits: ClassVar[ConnectionLimits]
    # Open connections, and the idle ones among them, oldest first (dicts keep order).
    connected: ClassVar[dict[BoundedH11Protocol, None]]
    idle: ClassVar[dict[BoundedH11Protocol, None]]

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[BoundedH11Protocol]:
        attributes = {"limits": limits, "connected": {}, "idle": {}}
        return cast(type[BoundedH11Protocol], type(cls.__name__, (cls,), attributes))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.connected[self] = None
        self._arm_read_deadline()
        self._track()
        if len(self.connected) > self.limits.max_connections:
            victim = next((c for c in self.idle if c is not self and not c._unread()), self)
            victim._close("limit")
            log.warning(
                "HTTP: %d connections open, the limit: closed the oldest idle one (or the new one "
                "when all are busy)",
                self.limits.max_connections,
            )
        HTTP_CONNECTIONS.set(len(self.connected))

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm_read_deadline()  # the first byte of a request: its whole must follow
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def _track(self) -> None:
        """File the connection as idle or busy, and end its read deadline once the request is
        read."""
        if self not in self.connected:
            return
        state = self.conn.their_state
        if state not in (h11.IDLE, h11.SEND_BODY):
            self._cancel_read_deadline()
        serving = self.cycle is not None and not self.cycle.response_complete
        if state is h11.IDLE and not serving:
            self.idle.pop(self, None)
            self.idle[self] = None  # newest last
        else:
            self.idle.pop(self, None)

    def _unread(self) -> int:
        """Bytes the kernel holds for this connection that the loop has not read yet: a
        request on its way (a new connection's usually is, by the time it is accepted)."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return 0
        pending = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, pending)
        except OSError:
            return 0
        return pending[0]

    def _arm_read_deadline(self) -> None:
        self._cancel_read_deadline()
        self._read_deadline = self.loop.call_later(self.limits.read_timeout, self._read_too_slow)

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_too_slow(self) -> None:
        self._read_deadline = None
        log.warning(
            "HTTP: closed a connection that sent no whole request within %g s",
            self.limits.read_timeout,
        )
        self._close("read_timeout")

    def _close(self, reason: str) -> None:
        HTTP_CONNECTIONS_CLOSED.labels(reason).inc()
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    def _forget(self) -> None:
        self._cancel_read_deadline()
        self.connected.pop(self, None)
        self.idle.pop(self, None)
        HTTP_CONNECTIONS.set(len(self.connected))
