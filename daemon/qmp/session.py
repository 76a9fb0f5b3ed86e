"""One supervised QMP session per VM.

``Session.run`` (connect mode) owns the whole life of a VM's monitor connection::

    idle -> connecting -> attaching -> running -> disconnected -> backoff -> connecting -> ...

Every transition is recorded in ``Session.transitions`` and in the VM's fleet record, and the
cause of every loss is kept. A hung or dead monitor only ever delays its own session: commands
have timeouts, and nothing here blocks the event loop.

``Session.serve`` follows one already established connection until it is lost; listen mode
(``daemon.qmp.listener``) uses it directly because there QEMU reconnects to us.
``PollSession`` is poll mode: connect, read, disconnect, every cycle, never holding the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from daemon.config import Address, Settings
from daemon.fleet import SessionState, VMState
from daemon.instruments import QMP_RECONNECTS
from daemon.journal import Journal
from daemon.qmp import probe
from daemon.qmp.connection import QMPConnection
from daemon.qmp.errors import ConnectFailed, QMPSessionError, SessionLost
from daemon.qmp.intake import Followups, apply_event, record
from daemon.qmp.schedule import PollSchedule

# Called after each poll with the live connection (None in poll mode once it is closed).
PollHook = Callable[[VMState, QMPConnection | None], Awaitable[None]]


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half fixed, half random, so VMs spread out."""
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class Session:
    """Supervisor of one VM's QMP connection (connect and listen modes)."""

    def __init__(
        self,
        vm: VMState,
        settings: Settings,
        journal: Journal,
        *,
        address: Address | None = None,
        on_poll: PollHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.vm = vm
        self.settings = settings
        self.journal = journal
        self.address = address
        self.on_poll = on_poll
        self.transitions: deque[str] = deque([SessionState.IDLE], maxlen=256)
        self._rng = rng or random.Random()
        self._conn: QMPConnection | None = None
        self._attached_before = False
        self._running_since: float | None = None

    # -- state ---------------------------------------------------------------------------------

    def _set(self, state: str, error: str | None = None) -> None:
        self.transitions.append(state)
        self.vm.set_session_state(state, error)

    # -- connect mode --------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, attach, follow, and reconnect with backoff, until cancelled."""
        if self.address is None:
            raise ValueError("Session.run needs an address (connect mode)")
        attempt = 0
        try:
            while True:
                self._set(SessionState.CONNECTING)
                conn = self._new_connection()
                try:
                    await conn.connect(self.address, self.settings.connect_timeout)
                except ConnectFailed as exc:
                    self._set(SessionState.DISCONNECTED, str(exc))
                else:
                    await self.serve(conn)
                if self._ran_long_enough():
                    attempt = 0
                delay = backoff_delay(
                    attempt, self.settings.backoff_initial, self.settings.backoff_max, self._rng
                )
                attempt += 1
                self._set(SessionState.BACKOFF)
                await asyncio.sleep(delay)
        finally:
            self._set(SessionState.STOPPED)

    def _ran_long_enough(self) -> bool:
        # A session that stayed up for a while starts its backoff over; a flapping one does not.
        if self._running_since is None:
            return False
        ran = time.monotonic() - self._running_since
        self._running_since = None
        return ran > max(10.0, 4 * self.settings.poll_interval)

    def _new_connection(self) -> QMPConnection:
        return QMPConnection(self.vm.name, command_timeout=self.settings.command_timeout)

    # -- one connection ------------------------------------------------------------------------

    async def serve(self, conn: QMPConnection) -> str:
        """Attach over an established connection and follow it until it is lost.

        Returns the cause of the loss. Cancellation closes the connection and propagates.
        """
        self._conn = conn
        attached = False
        cause = "closed"  # replaced below; kept if cancelled
        try:
            self._set(SessionState.ATTACHING)
            try:
                await probe.attach(conn, self.vm, stats_interval=self.settings.stats_interval)
            except (QMPSessionError, probe.BadReply) as exc:
                # A dropped connection explains a failed command better than the command does.
                cause = f"attach failed: {await conn.close() or exc}"
                return cause
            attached = True
            self._on_attached()
            cause = await self._follow(conn)
            return cause
        finally:
            self._conn = None
            await conn.close()
            self.vm.events_dropped = conn.events_dropped
            self._set(SessionState.DISCONNECTED, cause)
            if attached:
                record(self.journal, self.vm.name, "detach", "detach", {"cause": cause})

    def _on_attached(self) -> None:
        self.vm.attached_at = time.time()
        self._running_since = time.monotonic()
        if self._attached_before:
            self.vm.reconnects += 1
            QMP_RECONNECTS.labels(self.vm.name).inc()
        self._attached_before = True
        self._set(SessionState.RUNNING)
        self.vm.last_error = None
        record(
            self.journal,
            self.vm.name,
            "attach",
            "attach",
            {
                "mode": self.vm.attach,
                "address": self.vm.address,
                "qemu_version": self.vm.qemu_version,
                "pid": self.vm.pid,
            },
        )

    async def _follow(self, conn: QMPConnection) -> str:
        followups = Followups()
        wake = asyncio.Event()

        async def pump_events() -> None:
            while True:
                msg = await conn.next_event()
                apply_event(self.vm, dict(msg), self.journal, followups)
                if followups.any():
                    wake.set()

        async def poll_forever() -> None:
            loop = asyncio.get_running_loop()
            schedule = PollSchedule(self.settings.poll_interval, loop.time())
            while True:
                if followups.memory:
                    followups.memory = False
                    await probe.read_memory(conn, self.vm)
                    await probe.read_ram_layout(conn, self.vm)
                if followups.status:
                    followups.status = False
                    await probe.read_status(conn, self.vm)
                await probe.poll(conn, self.vm)
                if self.on_poll is not None:
                    await self.on_poll(self.vm, conn)
                stats = self.vm.guest_stats
                due = schedule.advance(
                    loop.time(),
                    stats.age(self.vm.last_poll or time.time()) if stats is not None else None,
                    self.vm.balloon.stats_polling_interval,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(due):
                        await wake.wait()
                wake.clear()

        tasks = [
            asyncio.create_task(pump_events(), name=f"{self.vm.name}-events"),
            asyncio.create_task(poll_forever(), name=f"{self.vm.name}-poll"),
            asyncio.create_task(conn.wait_lost(), name=f"{self.vm.name}-watch"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Prefer the reader's own error (what the peer did) over a command's view of it.
        reason = await conn.close()
        for task in done:
            exc = task.exception() if not task.cancelled() else None
            if exc is not None and not isinstance(exc, SessionLost):
                return reason or str(exc)
        return reason or "connection lost"

    # -- commands from the API -----------------------------------------------------------------

    async def command(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a command on the live connection; SessionLost when the VM is not attached."""
        conn = self._conn
        if conn is None or not conn.connected:
            raise SessionLost(f"{self.vm.name} is not attached")
        return await conn.execute(command, arguments)


class PollSession:
    """Poll mode: for a socket another manager also uses. Connect, read, disconnect each cycle."""

    def __init__(
        self,
        vm: VMState,
        settings: Settings,
        journal: Journal,
        *,
        address: Address,
        on_poll: PollHook | None = None,
    ) -> None:
        self.vm = vm
        self.settings = settings
        self.journal = journal
        self.address = address
        self.on_poll = on_poll
        self.transitions: deque[str] = deque([SessionState.IDLE], maxlen=256)
        self._lock = asyncio.Lock()  # one connection at a time: the socket serves one client

    def _set(self, state: str, error: str | None = None) -> None:
        self.transitions.append(state)
        self.vm.set_session_state(state, error)

    async def run(self) -> None:
        try:
            while True:
                await self.cycle()
                await asyncio.sleep(self.settings.poll_interval)
        finally:
            self._set(SessionState.STOPPED)

    async def cycle(self) -> None:
        """One connect-read-disconnect cycle; the VM is up when it succeeded."""
        was_up = self.vm.up
        try:
            async with self._lock:
                conn = QMPConnection(self.vm.name, command_timeout=self.settings.command_timeout)
                try:
                    await conn.connect(self.address, self.settings.connect_timeout)
                    await probe.attach(conn, self.vm, stats_interval=self.settings.stats_interval)
                    self.vm.last_poll = time.time()
                    if self.on_poll is not None:
                        await self.on_poll(self.vm, conn)
                finally:
                    await conn.close()
        except (QMPSessionError, probe.BadReply) as exc:
            self._set(SessionState.DISCONNECTED, str(exc))
            if was_up:
                record(self.journal, self.vm.name, "detach", "detach", {"cause": str(exc)})
            return
        if not was_up:
            self.vm.attached_at = self.vm.last_poll
            record(
                self.journal,
                self.vm.name,
                "attach",
                "attach",
                {"mode": "poll", "address": self.vm.address},
            )
        self._set(SessionState.RUNNING)
        self.vm.last_error = None

    async def command(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one command on a short-lived connection."""
        async with self._lock:
            conn = QMPConnection(self.vm.name, command_timeout=self.settings.command_timeout)
            try:
                await conn.connect(self.address, self.settings.connect_timeout)
                return await conn.execute(command, arguments)
            finally:
                await conn.close()
