"""How commands reach a guest agent: the ``AgentTransport`` seam and its Unix socket version.

The client above speaks only ``command(name, arguments, timeout)``, so another way to reach the
agent (libvirt's ``virDomainQemuAgentCommand``, where libvirt holds the socket) plugs in without
changing it. A transport raises only ``daemon.agent.errors``; an agent's error reply goes through
``command_error`` so "blocked" means the same everywhere.

``SocketTransport`` talks to the socket QEMU serves for a ``virtserialport`` named
``org.qemu.guest_agent.0`` (``-chardev socket,server=on``), with ``qemu.qmp``. What it adds to
the library, and why:

- No greeting and no ``qmp_capabilities``: qemu-ga speaks QMP's wire format without them.
- ``guest-sync-delimited`` on every connect. The agent's stream may hold what an earlier client
  left: a half-read command in its parser, replies nobody read. A 0xFF byte resets the agent's
  parser (it answers with an id-less parse error, which is stale by definition); the sync reply
  comes back behind a 0xFF sentinel, and everything before it is discarded.
- Timeouts on connect (including the sync) and on each command: a guest whose agent is not
  running or hangs never answers, and QEMU accepts the connection anyway.
- Any timeout or protocol trouble drops the connection; the next command reconnects and
  resyncs, so a late reply can never be taken for the answer to a later command.
- A small read limit, events and unroutable replies dropped and counted, and a cut-off when a
  guest floods them: everything on this socket comes from the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import (
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)
from qemu.qmp.error import ProtocolError
from qemu.qmp.message import DeserializationError, UnexpectedTypeError

from daemon.agent.errors import (
    AgentError,
    AgentTimeout,
    AgentUnavailable,
    BadReply,
    ConnectionDropped,
    command_error,
)

# The largest reply line accepted. guest-info is about 3 KiB; a file chunk of READ_CHUNK bytes
# is 4/3 of that in base64 plus a few dozen bytes of JSON.
READ_LIMIT = 64 * 1024
SYNC_SENTINEL = b"\xff"
# Stale bytes skipped while looking for the sync reply before the connection is given up.
MAX_STALE_BYTES = 1024 * 1024
# Events and replies nobody waits for that one connection tolerates before it is dropped.
MAX_UNROUTABLE = 16
DISCONNECT_TIMEOUT = 1.0


class AgentTransport(Protocol):
    """One way to send a command to one VM's guest agent."""

    async def command(
        self, name: str, arguments: Mapping[str, object] | None, timeout: float
    ) -> Any:
        """Run ``name`` and return the agent's ``return`` value (any JSON value: untrusted).

        Raises ``AgentError``: ``AgentUnavailable``, ``AgentTimeout`` (no answer within
        ``timeout`` seconds), ``CommandBlocked``/``CommandFailed`` (the agent's error reply),
        ``BadReply``.
        """
        ...

    async def close(self) -> None:
        """Release the connection, if the transport holds one. Never raises."""
        ...


class _Unroutable(ProtocolError):
    """The guest sent more events or unrequested replies than a connection tolerates."""


class _SyncFailed(Exception):
    """The sync handshake found no answer to our sync in the stream."""


class _AgentQMPClient(QMPClient):
    """QMPClient for qemu-ga: no greeting or negotiation, a resync on connect, and nothing a
    guest sends is kept unless a command waits for it."""

    def __init__(self, name: str, read_limit: int) -> None:
        super().__init__(name, readbuflen=read_limit)
        self.await_greeting = False
        self.negotiate = False
        self.unroutable = 0

    async def _establish_session(self) -> None:
        assert self._reader is not None and self._writer is not None
        token = secrets.randbelow(2**31)
        sync = Message({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        self._writer.write(SYNC_SENTINEL + bytes(sync))
        await self._writer.drain()
        await self._await_sync(token)
        await super()._establish_session()

    async def _await_sync(self, token: int) -> None:
        assert self._reader is not None
        skipped = 0
        while skipped <= MAX_STALE_BYTES:
            try:
                skipped += len(await self._reader.readuntil(SYNC_SENTINEL))
            except asyncio.LimitOverrunError as exc:
                # No sentinel within the read limit: drop what was scanned and keep looking.
                await self._reader.readexactly(exc.consumed)
                skipped += exc.consumed
                continue
            except asyncio.IncompleteReadError:
                raise EOFError from None
            try:
                line = await self._reader.readline()
            except ValueError:
                # A line over the read limit behind a stray 0xFF: not the sync reply.
                skipped += self.readbuflen
                continue
            skipped += len(line)
            with contextlib.suppress(ValueError):
                if json.loads(line) == {"return": token}:
                    return
            # A stale sync reply (an earlier client's), or garbage behind a stray 0xFF.
        raise _SyncFailed(f"no reply to guest-sync-delimited in {skipped} bytes of stale data")

    async def _on_message(self, msg: Message) -> None:
        exec_id = msg.get("id")
        if "event" not in msg and isinstance(exec_id, str) and exec_id in self._pending:
            await self._pending[exec_id].put(msg)
            return
        # qemu-ga sends no events, and after the sync no stale reply can be pending: whatever
        # else comes is the guest's doing. It must not reach qemu.qmp's unbounded event queues
        # nor its "server parse error" shutdown; it is counted, and a flood ends the connection.
        self._count_unroutable()

    def _count_unroutable(self) -> None:
        self.unroutable += 1
        if self.unroutable > MAX_UNROUTABLE:
            raise _Unroutable(f"more than {MAX_UNROUTABLE} events or unrequested replies")

    # qemu.qmp formats every message for its debug log even when debug logging is off.
    def _cb_outbound(self, msg: Message) -> Message:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


def _chain(exc: BaseException) -> list[BaseException]:
    # qemu.qmp wraps the interesting error (ConnectError.exc, ExecInterruptedError.__cause__).
    chain = [exc]
    while len(chain) < 8:
        inner = getattr(chain[-1], "exc", None) or chain[-1].__cause__
        if not isinstance(inner, BaseException) or inner in chain:
            break
        chain.append(inner)
    return chain


def _root_cause(exc: BaseException) -> BaseException:
    return _chain(exc)[-1]


def _stream_error(what: str, exc: BaseException, read_limit: int) -> AgentError:
    """The error for a connection that failed or broke while doing ``what``."""
    chain = _chain(exc)
    for link in chain:
        if isinstance(link, AgentError):
            return link
        if isinstance(link, _Unroutable | _SyncFailed):
            return BadReply(f"{what}: {link}")
        if isinstance(link, DeserializationError | UnicodeDecodeError):
            return BadReply(f"{what}: the agent sent a line that is not JSON")
        if isinstance(link, UnexpectedTypeError):
            return BadReply(f"{what}: the agent sent JSON that is not an object")
        if isinstance(link, ProtocolError):
            return BadReply(f"{what}: {type(link).__name__}: {link}")
    root = chain[-1]
    if isinstance(root, ExecInterruptedError):
        # Dropped under it, by an overlapping command's timeout or protocol error.
        return ConnectionDropped(f"{what}: the connection was dropped while it waited")
    if isinstance(root, EOFError):
        return AgentUnavailable(f"{what}: the agent socket closed the connection")
    if isinstance(root, ValueError) and "limit" in str(root):
        # asyncio's StreamReader: a line longer than its limit.
        return BadReply(f"{what}: the agent sent a line longer than {read_limit} bytes")
    if isinstance(root, OSError):
        return AgentUnavailable(f"{what}: {root.strerror or root}")
    return BadReply(f"{what}: {type(root).__name__}: {root}")


class SocketTransport:
    """The agent behind one Unix socket, held open between commands and reopened (with a
    resync) after any trouble. Commands may overlap (they are pipelined on the connection and
    the agent runs them in order); safe to share between tasks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        connect_timeout: float = 2.0,
        read_limit: int = READ_LIMIT,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.connect_timeout = connect_timeout
        self.read_limit = read_limit
        self.name = name or f"qga:{self.path.name}"
        self._client: _AgentQMPClient | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    async def command(
        self, name: str, arguments: Mapping[str, object] | None, timeout: float
    ) -> Any:
        async with self._lock:  # one connect at a time; commands may then overlap
            client = await self._connected()
        try:
            async with asyncio.timeout(timeout):
                return await client.execute(name, dict(arguments) if arguments else None)
        except TimeoutError as exc:
            await self._drop(client)
            raise AgentTimeout(f"{name}: no reply within {timeout:g} s") from exc
        except ExecuteError as exc:
            raise command_error(name, exc.error_class, str(exc)) from exc
        except (QMPError, OSError, EOFError, ValueError) as exc:
            # The reader's own error (EOF, bad JSON, a line over the limit) is the cause.
            cause = await self._drop(client) or exc
            error = _stream_error(name, cause, self.read_limit)
            # An agent error met in the chain keeps the cause it has.
            raise error from (error.__cause__ if error in _chain(cause) else cause)
        except BaseException:
            # Cancelled mid-command: a reply may still come, so the stream is out of step.
            self._abandon(client)
            raise

    async def close(self) -> None:
        async with self._lock:
            await self._drop(self._client)

    async def _connected(self) -> _AgentQMPClient:
        if self._client is not None and self._client.runstate != Runstate.RUNNING:
            await self._drop(self._client)
        if self._client is not None:
            return self._client
        where = f"agent socket {self.path}"
        if not self.path.exists():
            # The usual state of a VM without an agent channel: say so without qemu.qmp's
            # error log of a failed connect on every attempt.
            raise AgentUnavailable(f"{where} does not exist")
        client = _AgentQMPClient(self.name, self.read_limit)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await client.connect(str(self.path))
        except TimeoutError:
            await _quiet_disconnect(client)
            raise AgentTimeout(
                f"{where}: no answer to guest-sync-delimited within {self.connect_timeout:g} s "
                "(qemu-ga not running in the guest, hung, or another client holds the socket)"
            ) from None
        except AssertionError:
            # qemu.qmp's connect() asserts the session is running when it returns; a peer that
            # breaks the connection right after the sync (hang-up, a flood) fails that assert.
            cause = await _quiet_disconnect(client)
            raise _stream_error(where, cause or EOFError(), self.read_limit) from None
        except (QMPError, OSError) as exc:
            # qemu.qmp wraps the socket's own error in ConnectError.
            root = _root_cause(exc)
            if isinstance(root, FileNotFoundError):
                raise AgentUnavailable(f"{where} does not exist") from None
            if isinstance(root, ConnectionRefusedError):
                raise AgentUnavailable(f"{where}: nothing listens (VM not running?)") from None
            raise _stream_error(where, exc, self.read_limit) from None
        self._client = client
        return client

    async def _drop(self, client: _AgentQMPClient | None) -> BaseException | None:
        """Disconnect ``client`` (and forget it if it is the current one); returns the error
        that broke the connection, if one did. Overlapping commands may drop the same client:
        the second gets its error again, or None."""
        if client is None:
            return None
        if client is self._client:
            self._client = None
        return await _quiet_disconnect(client)

    def _abandon(self, client: _AgentQMPClient) -> None:
        if client is self._client:
            self._client = None
        # Cannot await while being cancelled: disconnect in the background.
        task = asyncio.get_running_loop().create_task(_quiet_disconnect(client))
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[BaseException | None]] = set()


async def _quiet_disconnect(client: QMPClient) -> BaseException | None:
    if client.runstate == Runstate.IDLE:
        return None
    try:
        async with asyncio.timeout(DISCONNECT_TIMEOUT):
            await client.disconnect()
    except Exception as exc:
        return exc
    return None
