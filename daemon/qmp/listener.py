"""Listen mode: reclaimd listens on one Unix socket and every QEMU connects to it.

QEMU is started with ``-chardev socket,id=rd,path=PATH,reconnect=5 -mon chardev=rd,mode=control``.
Each accepted connection gets its own QMP session (``qemu.qmp`` accepts a connected socket), is
named by ``query-name`` (else its UUID, else a socket of its own, else its pid: see
``_identify``), and is followed until it hangs up. QEMU then
reconnects by itself, so there is no backoff here: the VM's record waits, marked down.

Whoever may connect to the socket may present itself as any VM, so a connection must pass two
checks before it gets a session:

- **Who connects.** The peer's uid (SO_PEERCRED, which the peer cannot forge) must be root,
  reclaimd's own, one of ``listen_allowed_uids``, or the peer must be in ``listen_socket_group``
  (as its gid or a supplementary group). The socket's mode says the same to the kernel: 0600,
  or 0660 with that group (and its directory 0710 with it), e.g. for QEMUs that run as
  ``libvirt-qemu``.
- **Which VM it claims.** A connection that identifies as a VM that is attached (the same name,
  or the same UUID, while that VM's session is up or attaching) is an impostor: the real VM
  keeps its record and session. QEMU's default all-zero UUID identifies nothing.

A refused peer gets no session: its connection is closed, the refusal is logged, counted
(``reclaimd_listen_refused_total{reason}``) and, for an impostor, journalled under the VM it
claimed (at most once per VM every ``REFUSAL_JOURNAL_INTERVAL`` seconds, so a peer that retries
in a loop cannot fill that VM's history).

The listener accepts, checks and identifies; ``session_for(name)`` (the daemon) gives the VM's
session, made on its first connection and kept for its reconnections. Stopping the accept loop
leaves the sessions being served alone: the daemon asks them to stop, and ``wait_served`` waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from daemon.config import Settings
from daemon.files import make_dirs
from daemon.fleet import Fleet
from daemon.host.peercred import PeerCredentials, peer_credentials, process_groups
from daemon.instruments import LISTEN_REFUSED
from daemon.journal import Journal
from daemon.qmp.connection import QMPConnection
from daemon.qmp.errors import CommandFailed, QMPSessionError
from daemon.qmp.intake import record
from daemon.qmp.session import Session
from daemon.untrusted import MAX_VM_NAME, ZERO_UUID, text_or_none, vm_name

log = logging.getLogger(__name__)

MAX_PENDING_HANDSHAKES = 64
REFUSAL_JOURNAL_INTERVAL = 10.0
REFUSAL_LOG_INTERVAL = 10.0


class PeerPolicy:
    """Who may connect to the listen socket (see the module docstring)."""

    def __init__(self, uids: frozenset[int], gid: int | None) -> None:
        self.uids = uids
        self.gid = gid

    @classmethod
    def from_settings(cls, settings: Settings) -> PeerPolicy:
        """Root, this process's uid, the configured uids and group. OSError: no such group."""
        return cls(
            frozenset({0, os.geteuid(), *settings.listen_allowed_uids}),
            resolve_group(settings.listen_socket_group),
        )

    def allows(self, peer: PeerCredentials | None) -> bool:
        if peer is None:
            return False
        if peer.uid in self.uids:
            return True
        if self.gid is None:
            return False
        return peer.gid == self.gid or (
            peer.pid is not None and self.gid in process_groups(peer.pid)
        )


def resolve_group(group: str | None) -> int | None:
    """The gid of a group given by name or number; OSError when there is no such group."""
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise OSError(f"listen_socket_group {group!r}: no such group") from None


class Listener:
    """Accept QEMUs on ``path`` and run a ``Session`` for each that passes the checks."""

    def __init__(
        self,
        path: Path,
        settings: Settings,
        fleet: Fleet,
        *,
        session_for: Callable[[str], Session],
        journal: Journal | None = None,
    ) -> None:
        self.path = path
        self.settings = settings
        self.fleet = fleet
        self.session_for = session_for
        self.journal = journal
        self.policy = PeerPolicy.from_settings(settings)
        self._sock: socket.socket | None = None
        self._served: set[asyncio.Task[None]] = set()
        self._handshakes = asyncio.Semaphore(MAX_PENDING_HANDSHAKES)
        # Names (and UUIDs) of the VMs whose connection is being attached or served.
        self._claimed: dict[str, int | None] = {}  # name -> peer pid
        self._claimed_uuids: dict[str, str] = {}  # UUID -> name
        self._journalled: dict[str, float] = {}  # VM -> when a refusal was last journalled
        self._logged: dict[str, float] = {}  # reason -> when it was last logged

    def open(self) -> None:
        """Bind the socket (replacing a stale one): 0600 in a 0700 directory, or 0660 in a 0710
        directory with ``listen_socket_group``. OSError: no such group, or cannot bind."""
        gid = self.policy.gid
        created = make_dirs(self.path.parent, 0o700 if gid is None else 0o710)
        for directory in created:
            if gid is not None:
                os.chown(directory, -1, gid)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)  # nobody else can connect between bind and chmod
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            if gid is not None:
                os.chown(self.path, -1, gid)
                os.chmod(self.path, 0o660)
            else:
                os.chmod(self.path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
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
        peer = peer_credentials(sock)
        if not self.policy.allows(peer):
            sock.close()
            who = f"uid {peer.uid}, pid {peer.pid}" if peer else "unknown credentials"
            self._refused("peer_uid", f"a process ({who}) is not allowed to connect")
            return
        conn = QMPConnection("listen", command_timeout=self.settings.command_timeout)
        try:
            async with self._handshakes:
                await conn.adopt(sock, timeout=self.settings.connect_timeout)
                name, uuid = await self._identify(conn)
        except (QMPSessionError, OSError) as exc:
            self._refused("handshake", f"a peer failed the handshake: {exc}")
            await conn.close()
            return
        holder = self._holder(name, uuid)
        if holder is not None:
            await conn.close()
            self._impostor(name, uuid, peer, holder)
            return
        session = self.session_for(name)
        if session.stopping:
            await conn.close()
            return
        self._claimed[name] = conn.peer_pid
        if uuid is not None:
            self._claimed_uuids[uuid] = name
        try:
            await session.serve(conn)
        finally:
            self._claimed.pop(name, None)
            if uuid is not None:
                self._claimed_uuids.pop(uuid, None)

    async def _identify(self, conn: QMPConnection) -> tuple[str, str | None]:
        """The VM's name and its UUID, if it has one that identifies it (not the all-zero
        default). The name: ``-name``, else the UUID, else the first Unix socket QEMU itself
        listens on (a ``-qmp``, serial or agent socket: stable across restarts of that VM,
        unlike its pid), else ``pid-PID`` as the last resort."""
        reply = await conn.execute("query-name")
        name = reply.get("name") if isinstance(reply, dict) else None
        uuid_reply = await conn.execute("query-uuid")
        raw_uuid = uuid_reply.get("UUID") if isinstance(uuid_reply, dict) else None
        uuid = text_or_none(raw_uuid, MAX_VM_NAME)
        if uuid == ZERO_UUID or not uuid:
            uuid = None
        base = vm_name(name) or vm_name(uuid) or await self._own_socket(conn)
        return base or f"pid-{conn.peer_pid or 'unknown'}", uuid

    async def _own_socket(self, conn: QMPConnection) -> str | None:
        """``socket-NAME`` for the first server socket in QEMU's ``query-chardev`` (its file
        name is ``unix:PATH,server=on``), NAME the socket's file name without its suffix."""
        try:
            chardevs = await conn.execute("query-chardev")
        except CommandFailed:
            return None
        for chardev in chardevs if isinstance(chardevs, list) else ():
            filename = chardev.get("filename") if isinstance(chardev, dict) else None
            if not isinstance(filename, str) or not filename.startswith("unix:"):
                continue
            path, *options = filename[len("unix:") :].split(",")
            if any(o in ("server", "server=on") for o in options) and path != str(self.path):
                stem = vm_name(Path(path).stem)
                if stem:
                    return f"socket-{stem}"
        return None

    def _holder(self, name: str, uuid: str | None) -> str | None:
        """The attached VM whose identity ``name`` or ``uuid`` claims, if any."""
        existing = self.fleet.get(name)
        if name in self._claimed or (existing is not None and existing.up):
            return name
        return self._claimed_uuids.get(uuid) if uuid is not None else None

    def _impostor(
        self, name: str, uuid: str | None, peer: PeerCredentials | None, holder: str
    ) -> None:
        pid = peer.pid if peer else None
        real = self.fleet.get(holder)
        detail = (
            f"refused a connection from pid {pid} (uid {peer.uid if peer else '?'}) that "
            f"claims the identity of attached VM {holder!r}"
            f" (name {name!r}{f', UUID {uuid}' if uuid else ''};"
            f" attached pid {real.pid if real else '?'})"
        )
        self._refused("identity", detail)
        now = time.monotonic()
        if self.journal is not None and now - self._journalled.get(holder, -1e9) >= (
            REFUSAL_JOURNAL_INTERVAL
        ):
            self._journalled[holder] = now
            data = {
                "reason": "identity claimed by another connection",
                "pid": pid,
                "uid": peer.uid if peer else None,
                "name": name,
                "uuid": uuid,
            }
            record(self.journal, holder, "refused", "connection", data)
        # Forget VMs that went away, so the table stays as small as the fleet.
        for known in [n for n in self._journalled if n not in self.fleet]:
            del self._journalled[known]

    def _refused(self, reason: str, detail: str) -> None:
        LISTEN_REFUSED.labels(reason).inc()
        now = time.monotonic()
        if now - self._logged.get(reason, -1e9) >= REFUSAL_LOG_INTERVAL:
            self._logged[reason] = now
            log.warning("listen socket %s: %s", self.path, detail)
