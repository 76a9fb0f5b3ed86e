"""One QMP connection, on top of ``qemu.qmp.QMPClient``.

What this adds to the library, and why:

- Timeouts on connect and on every command: ``QMPClient.connect`` has none and a hung monitor
  would otherwise block a session forever.
- One bounded event queue: qemu.qmp's listeners, including the default ``client.events``, keep
  every event in an unbounded queue and history. We route events to a queue of fixed size that,
  when full, drops the oldest event that does not change the VM's state (a lifecycle event is
  dropped only when the queue holds nothing else), and reports every drop as it happens.
- A reader that yields to the event loop every few messages: a peer that sends a megabyte of
  events at once would otherwise hold the loop for as long as parsing them takes.
- A smaller read limit (1 MiB, not 10 MiB): no reply reclaimd asks for comes close, and a peer
  that sends an endless line is cut off sooner.
- The peer's pid from ``SO_PEERCRED``: we open the socket ourselves and hand it to the client,
  which is how the host view finds QEMU's memory.
- Per-command metrics and QEMU's errors mapped to ``daemon.qmp.errors``.
- No pretty-printed copy of each message unless debug logging is on, and qemu.qmp's log records
  bounded in length and rate (they quote what the peer sent: a parse error quotes the whole line).
- Everything the peer says that ends up in a message (error descriptions, the greeting's
  version) cleaned and bounded (``daemon.untrusted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError, Runstate

from daemon.config import Address
from daemon.host.peercred import peer_pid
from daemon.instruments import QMP_COMMAND_SECONDS, QMP_COMMANDS
from daemon.qmp.errors import CommandFailed, CommandTimeout, ConnectFailed, SessionLost
from daemon.qmp.intake import STATE_EVENTS
from daemon.untrusted import bounded_int, one_line

READ_LIMIT = 1024 * 1024
EVENT_QUEUE_SIZE = 1024
MAX_CAUSE = 240
MAX_PACKAGE = 128
BUSY_TIMEOUT_FACTOR = 10  # a command behind a flood waits at most this many timeouts
READER_BURST = 16  # messages the reader parses before it lets other tasks run
LOG_RECORD_CHARS = 500
LOG_RECORDS_PER_SECOND = 5.0  # per connection, with a burst of as many


class EventQueue:
    """A bounded FIFO of QMP events that keeps those that change the VM's state.

    When full, ``put`` drops the oldest event not in ``precious`` (a BALLOON_CHANGE only says
    what the newest one says again); a precious event (SHUTDOWN, RESET...) is dropped only when
    the queue holds nothing else. Events come out in the order they arrived.
    """

    def __init__(self, size: int, precious: frozenset[str] = STATE_EVENTS) -> None:
        if size < 1:
            raise ValueError(f"event queue size must be at least 1, not {size}")
        self.size = size
        self.precious = precious
        self._order = itertools.count()
        self._precious: deque[tuple[int, Message]] = deque()
        self._other: deque[tuple[int, Message]] = deque()
        self._nonempty = asyncio.Event()

    def __len__(self) -> int:
        return len(self._precious) + len(self._other)

    def put(self, msg: Message) -> bool:
        """Queue ``msg``; False if an older event had to be dropped for it."""
        dropped = len(self) >= self.size
        if dropped:
            (self._other or self._precious).popleft()
        name = msg.get("event")  # anything: the peer may send a list as an event's name
        target = self._precious if isinstance(name, str) and name in self.precious else self._other
        target.append((next(self._order), msg))
        self._nonempty.set()
        return not dropped

    def get_nowait(self) -> Message | None:
        """The oldest event, or None when there is none."""
        precious, other = self._precious, self._other
        if not precious and not other:
            self._nonempty.clear()
            return None
        if not other or (precious and precious[0][0] < other[0][0]):
            return precious.popleft()[1]
        return other.popleft()[1]

    async def get(self) -> Message:
        """Wait for the oldest event. Cancelling the wait loses nothing."""
        while (msg := self.get_nowait()) is None:
            await self._nonempty.wait()
        return msg


class _BoundedLog(logging.Filter):
    """qemu.qmp's records of one connection, cut to one bounded line and rate-limited: they
    quote what the peer sent, and a peer that misbehaves in a loop would fill the log."""

    def __init__(self) -> None:
        super().__init__()
        self._tokens = LOG_RECORDS_PER_SECOND
        self._last = time.monotonic()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        rate = LOG_RECORDS_PER_SECOND
        self._tokens = min(rate, self._tokens + (now - self._last) * rate)
        self._last = now
        if self._tokens < 1 and record.levelno < logging.CRITICAL:
            self.suppressed += 1
            return False
        self._tokens -= 1
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format: say so, never raise
            text = f"(unformattable log record: {record.msg!r:.100})"
        if self.suppressed:
            text += f" ({self.suppressed} earlier messages suppressed)"
            self.suppressed = 0
        record.msg, record.args = one_line(text, LOG_RECORD_CHARS), None
        return True


class _BoundedClient(QMPClient):
    """QMPClient whose events go to one bounded queue instead of its unbounded listeners, whose
    reader lets other tasks run between bursts, and whose log is bounded."""

    def __init__(self, name: str, queue_size: int) -> None:
        super().__init__(name, readbuflen=READ_LIMIT)
        self.event_queue = EventQueue(queue_size)
        self.events_dropped = 0
        self.on_event_dropped: Callable[[], None] | None = None
        self._unyielded = 0
        self.received = 0  # messages read: a peer that sends is busy, not hung
        # One filter per connection, on the child logger qemu.qmp gives each client name; a
        # logger lives as long as the process, so a reconnecting VM's filters are replaced.
        for old in [f for f in self.logger.filters if isinstance(f, _BoundedLog)]:
            self.logger.removeFilter(old)
        self.logger.addFilter(_BoundedLog())

    async def _event_dispatch(self, msg: Message) -> None:
        if not self.event_queue.put(msg):
            self.events_dropped += 1
            if self.on_event_dropped is not None:
                self.on_event_dropped()

    async def _bh_recv_message(self) -> None:
        await super()._bh_recv_message()
        self.received += 1
        # Reading a line already in the buffer never suspends: without this, one burst of a
        # flooding peer is parsed in one go while every other VM and the API wait.
        self._unyielded += 1
        if self._unyielded >= READER_BURST:
            self._unyielded = 0
            await asyncio.sleep(0)

    # qemu.qmp pretty-prints every message (json.dumps with indent) for its debug log even when
    # debug logging is off; at hundreds of VMs that is a large share of the daemon's CPU.
    def _cb_outbound(self, msg: Message) -> Message:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


def describe(exc: BaseException) -> str:
    """A one-line human cause for an exception, unwrapping qemu.qmp's wrappers."""
    root: BaseException = exc
    while True:
        inner = getattr(root, "exc", None) or root.__cause__
        if not isinstance(inner, BaseException) or inner is root:
            break
        root = inner
    if isinstance(root, EOFError):
        return "connection closed by peer"
    text = str(root).strip() or type(root).__name__
    if isinstance(root, OSError) and root.strerror:
        text = root.strerror
    if root is not exc:
        text = f"{exc}: {text}"
    # Parse errors quote the peer's raw bytes, which may be megabytes: keep one short line.
    return one_line(text[: 4 * MAX_CAUSE], MAX_CAUSE)


class QMPConnection:
    """A single connected QMP session with timed commands and a bounded event queue.

    Use one instance per connection attempt; ``close()`` ends it and returns the cause of the
    loss if the peer caused one.
    """

    def __init__(
        self, name: str, *, command_timeout: float, event_queue_size: int = EVENT_QUEUE_SIZE
    ) -> None:
        self.name = name
        self.command_timeout = command_timeout
        self.peer_pid: int | None = None
        self._client = _BoundedClient(name, event_queue_size)

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    @property
    def events_dropped(self) -> int:
        """Events dropped because the queue was full, over the life of this connection."""
        return self._client.events_dropped

    @property
    def on_event_dropped(self) -> Callable[[], None] | None:
        """Called at once for each event dropped (the session counts them live)."""
        return self._client.on_event_dropped

    @on_event_dropped.setter
    def on_event_dropped(self, callback: Callable[[], None] | None) -> None:
        self._client.on_event_dropped = callback

    @property
    def qemu_version(self) -> tuple[str, str]:
        """(``major.minor.micro``, package) from the greeting; ``?`` for a part that is not a
        plausible number."""
        greeting = self._client.greeting
        version = greeting.QMP.version if greeting is not None else None
        qemu = version.get("qemu") if isinstance(version, dict) else None
        if not isinstance(qemu, dict) or not isinstance(version, dict):
            return ("", "")
        parts = (bounded_int(qemu.get(k), 0, 99_999) for k in ("major", "minor", "micro"))
        numbers = ".".join("?" if n is None else str(n) for n in parts)
        package = version.get("package")
        return (numbers, one_line(package, MAX_PACKAGE) if isinstance(package, str) else "")

    async def connect(self, address: Address, timeout: float) -> None:
        """Connect, read the greeting and negotiate, all within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                sock = await _open_socket(address)
                await self.adopt(sock, timeout=None)
        except TimeoutError:
            raise ConnectFailed(f"{address}: no QMP greeting within {timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"{address}: {exc.strerror or exc}") from exc

    async def adopt(self, sock: socket.socket, timeout: float | None) -> None:
        """Run the QMP handshake on an already connected socket (listen mode uses this)."""
        if sock.family == socket.AF_UNIX:
            self.peer_pid = peer_pid(sock)
        try:
            async with asyncio.timeout(timeout):
                await self._client.connect(sock)
        except TimeoutError:
            sock.close()
            raise ConnectFailed(f"no QMP greeting within {timeout:g} s") from None
        except QMPError as exc:
            sock.close()
            raise ConnectFailed(describe(exc)) from exc
        except AssertionError as exc:
            # qemu.qmp asserts the session runs once negotiated; a peer that hangs up or
            # sends garbage right after negotiation makes that assertion fail.
            sock.close()
            with contextlib.suppress(Exception):
                await self._client.disconnect()  # what it started (reader, writer) ends
            raise ConnectFailed("the peer broke the connection while negotiating") from exc

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run one command; returns QEMU's ``return`` value.

        Raises CommandFailed for QEMU errors, CommandTimeout for no reply in time and
        SessionLost when the connection is gone.

        "In time" means: within ``timeout`` seconds of the last message from the peer, and
        within BUSY_TIMEOUT_FACTOR timeouts in all. A reply comes after everything the peer
        sent before it, so behind a flood of events it is late although the monitor is not
        hung; a hung monitor sends nothing at all.
        """
        limit = self.command_timeout if timeout is None else timeout
        started = time.perf_counter()
        outcome = "ok"
        client = self._client
        reply = asyncio.ensure_future(
            client.execute(command, dict(arguments) if arguments else None)
        )
        try:
            give_up = time.monotonic() + limit * BUSY_TIMEOUT_FACTOR
            while True:
                received = client.received
                done, _ = await asyncio.wait({reply}, timeout=limit)
                if done:
                    return reply.result()
                if client.received == received or time.monotonic() >= give_up:
                    raise TimeoutError
        except TimeoutError as exc:
            outcome = "timeout"
            raise CommandTimeout(command, limit) from exc
        except ExecuteError as exc:
            outcome = "error"
            raise CommandFailed(command, exc.error_class, str(exc)) from exc
        except (ExecInterruptedError, QMPError, OSError, EOFError) as exc:
            outcome = "disconnected"
            raise SessionLost(f"{command}: {describe(exc)}") from exc
        finally:
            if not reply.done():
                reply.cancel()
                await asyncio.gather(reply, return_exceptions=True)
            QMP_COMMANDS.labels(command, outcome).inc()
            QMP_COMMAND_SECONDS.labels(command).observe(time.perf_counter() - started)

    async def next_event(self) -> Message:
        """Wait for the next QMP event."""
        return await self._client.event_queue.get()

    def take_queued_events(self) -> list[Message]:
        """The events received and not yet taken, oldest first; the queue is empty after."""
        queue, events = self._client.event_queue, []
        while (msg := queue.get_nowait()) is not None:
            events.append(msg)
        return events

    async def wait_lost(self) -> None:
        """Return when the connection leaves the running state (peer hang-up, bad data)."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()

    async def close(self, timeout: float = 2.0) -> str | None:
        """Disconnect; returns the reason the peer broke the connection, if it did."""
        if self._client.runstate == Runstate.IDLE:
            return None
        try:
            async with asyncio.timeout(timeout):
                await self._client.disconnect()
        except TimeoutError:
            return "disconnect timed out"
        except Exception as exc:
            # The reader's error surfaces here: it is the cause of the loss.
            return describe(exc)
        return None


async def _open_socket(address: Address) -> socket.socket:
    loop = asyncio.get_running_loop()
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address.path
    else:
        infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {address.host}")
        family, _, _, _, target = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, target)
    except BaseException:
        sock.close()
        raise
    with contextlib.suppress(OSError):
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
