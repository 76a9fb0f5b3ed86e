"""One QMP connection, on top of ``qemu.qmp.QMPClient``.

What this adds to the library, and why:

- Timeouts on connect and on every command: ``QMPClient.connect`` has none and a hung monitor
  would otherwise block a session forever.
- One bounded event queue: qemu.qmp's listeners, including the default ``client.events``, keep
  every event in an unbounded queue and history. We route events to a queue of fixed size and
  count what it had to drop instead.
- A smaller read limit (1 MiB, not 10 MiB): no reply reclaimd asks for comes close, and a peer
  that sends an endless line is cut off sooner.
- The peer's pid from ``SO_PEERCRED``: we open the socket ourselves and hand it to the client,
  which is how the host view finds QEMU's memory.
- Per-command metrics and QEMU's errors mapped to ``daemon.qmp.errors``.
- No pretty-printed copy of every message unless debug logging is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError, Runstate

from daemon.config import Address
from daemon.host.peercred import peer_pid
from daemon.instruments import QMP_COMMAND_SECONDS, QMP_COMMANDS
from daemon.qmp.errors import CommandFailed, CommandTimeout, ConnectFailed, SessionLost

READ_LIMIT = 1024 * 1024
EVENT_QUEUE_SIZE = 1024
MAX_CAUSE = 240


class _BoundedClient(QMPClient):
    """QMPClient whose events go to one bounded queue instead of its unbounded listeners."""

    def __init__(self, name: str, queue_size: int) -> None:
        super().__init__(name, readbuflen=READ_LIMIT)
        self.event_queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_size)
        self.events_dropped = 0

    async def _event_dispatch(self, msg: Message) -> None:
        if self.event_queue.full():
            # Oldest first: the newest state is what matters for a monitor.
            self.event_queue.get_nowait()
            self.events_dropped += 1
        self.event_queue.put_nowait(msg)

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
    text = " ".join(text.split())
    return text if len(text) <= MAX_CAUSE else text[: MAX_CAUSE - 3] + "..."


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
        return self._client.events_dropped

    @property
    def qemu_version(self) -> tuple[str, str]:
        """(``major.minor.micro``, package) from the greeting."""
        greeting = self._client.greeting
        version = greeting.QMP.version if greeting is not None else None
        qemu = version.get("qemu") if isinstance(version, dict) else None
        if not isinstance(qemu, dict) or not isinstance(version, dict):
            return ("", "")
        numbers = ".".join(str(qemu.get(k, "?")) for k in ("major", "minor", "micro"))
        return (numbers, str(version.get("package", "")))

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

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run one command; returns QEMU's ``return`` value.

        Raises CommandFailed for QEMU errors, CommandTimeout for no reply in time and
        SessionLost when the connection is gone.
        """
        limit = self.command_timeout if timeout is None else timeout
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(limit):
                return await self._client.execute(command, dict(arguments) if arguments else None)
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
            QMP_COMMANDS.labels(command, outcome).inc()
            QMP_COMMAND_SECONDS.labels(command).observe(time.perf_counter() - started)

    async def next_event(self) -> Message:
        """Wait for the next QMP event."""
        return await self._client.event_queue.get()

    def take_queued_events(self) -> list[Message]:
        """The events received and not yet taken, oldest first; the queue is empty after."""
        queue, events = self._client.event_queue, []
        while not queue.empty():
            events.append(queue.get_nowait())
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
