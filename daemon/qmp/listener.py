"""Listen mode: reclaimd listens on one Unix socket and every QEMU connects to it.

QEMU is started with ``-chardev socket,id=rd,path=PATH,reconnect=5 -mon chardev=rd,mode=control``.
Each accepted connection gets its own QMP session (``qemu.qmp`` accepts a connected socket), is
named by ``query-name`` (else its UUID, else its pid), and is followed until it hangs up. QEMU then
reconnects by itself, so there is no backoff here: the VM's record waits, marked down.

The listener accepts and identifies; ``session_for(name)`` (the daemon) gives the VM's session,
made on its first connection and kept for its reconnections. Stopping the accept loop leaves the
sessions being served alone: the daemon asks them to stop, and ``wait_served`` waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from daemon.config import Settings
from daemon.fleet import Fleet, VMState
from daemon.qmp.connection import QMPConnection
from daemon.qmp.errors import QMPSessionError
from daemon.qmp.session import Session

log = logging.getLogger(__name__)

MAX_PENDING_HANDSHAKES = 64


class Listener:
    """Accept QEMUs on ``path`` and run a ``Session`` for each."""

    def __init__(
        self,
        path: Path,
        settings: Settings,
        fleet: Fleet,
        *,
        session_for: Callable[[str], Session],
    ) -> None:
        self.path = path
        self.settings = settings
        self.fleet = fleet
        self.session_for = session_for
        self._sock: socket.socket | None = None
        self._served: set[asyncio.Task[None]] = set()
        self._handshakes = asyncio.Semaphore(MAX_PENDING_HANDSHAKES)

    def open(self) -> None:
        """Bind the socket (replacing a stale one) with owner-only permissions."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock

    async def run(self) -> None:
        """Accept until cancelled; each connection is handled in its own task."""
        if self._sock is None:
            self.open()
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn_sock, _ = await loop.sock_accept(self._sock)
                task = asyncio.create_task(self._handle(conn_sock))
                self._served.add(task)
                task.add_done_callback(self._served.discard)
        finally:
            self.close()

    async def wait_served(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the connections being served, then cancel what is left."""
        tasks = list(self._served)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, sock: socket.socket) -> None:
        conn = QMPConnection("listen", command_timeout=self.settings.command_timeout)
        try:
            async with self._handshakes:
                await conn.adopt(sock, timeout=self.settings.connect_timeout)
                name = await self._identify(conn)
        except (QMPSessionError, OSError) as exc:
            log.warning("listen socket: a peer failed the handshake: %s", exc)
            await conn.close()
            return
        session = self.session_for(name)
        if session.stopping:
            await conn.close()
            return
        await session.serve(conn)

    async def _identify(self, conn: QMPConnection) -> str:
        """The VM's name: ``-name``, else its UUID, else its pid; made unique among live VMs."""
        reply = await conn.execute("query-name")
        name = reply.get("name") if isinstance(reply, dict) else None
        uuid_reply = await conn.execute("query-uuid")
        uuid = uuid_reply.get("UUID") if isinstance(uuid_reply, dict) else None
        base = _safe_name(name) or _safe_name(uuid) or f"pid-{conn.peer_pid or 'unknown'}"
        existing: VMState | None = self.fleet.get(base)
        if existing is not None and existing.up and existing.uuid and existing.uuid != uuid:
            # Two live QEMUs with one name: keep both, told apart by UUID.
            return f"{base}-{(uuid or str(conn.peer_pid))[:8]}"
        return base


def _safe_name(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    cleaned = "".join(c if c.isalnum() or c in "_.:@-" else "_" for c in value.strip())[:128]
    if not cleaned or cleaned == "00000000-0000-0000-0000-000000000000":
        return None
    return cleaned
