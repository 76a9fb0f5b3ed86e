"""One supervised QMP session per VM.

``Session.run`` (connect mode) owns the whole life of a VM's monitor connection::

    idle -> connecting -> attaching -> running -> disconnected -> backoff -> connecting -> ...

Each session kind has a transition table (``CONNECT_TRANSITIONS``, ``POLL_TRANSITIONS``); a
change the table does not allow raises ``TransitionError``, as qemu.qmp refuses a call in the
wrong ``Runstate``. Every transition is recorded in ``transitions`` and in the VM's fleet record,
and the cause of every loss is kept. A hung or dead monitor only ever delays its own session:
commands have timeouts, and nothing here blocks the event loop.

``Session.serve`` follows one already established connection until it is lost; listen mode
(``daemon.qmp.listener``) uses it directly because there QEMU reconnects to us.
``PollSession`` is poll mode: connect, read, disconnect, every cycle, never holding the socket.

What a poll does is the caller's: each session calls its ``cycle`` with a ``QMPMonitor`` on
schedule (``daemon.vmcycle`` runs the whole cycle; the default only polls the monitor).
``request_stop()`` asks a session to finish: it leaves its cycle, closes the connection, records
the detach and stops, so shutdown needs no cancellation unless a session does not finish in time.

Reconnecting: the backoff starts over whenever a session reached running (a QEMU that restarts
is not a flapping monitor), and a Unix socket that is replaced while a session waits (a new QEMU
bound it) ends the wait at once. Events QEMU sent before a connection ended are recorded
whatever ended it, before its detach. A VM gets ``event_rate`` events a second applied (in
bursts of ``event_burst``): beyond that, and when a flood outruns the session, events are
dropped and counted as they are (``VMState.events_dropped``,
``reclaimd_qmp_events_dropped_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from daemon.config import Address, Settings
from daemon.fleet import SessionState, VMState
from daemon.instruments import QMP_RECONNECTS
from daemon.journal import Journal
from daemon.qmp import probe
from daemon.qmp.connection import QMPConnection
from daemon.qmp.errors import ConnectFailed, QMPSessionError, SessionLost, TransitionError
from daemon.qmp.intake import (
    EventBudget,
    Followups,
    apply_event,
    count_dropped,
    drop_event,
    record,
)
from daemon.qmp.monitor import QMPMonitor
from daemon.qmp.schedule import PollSchedule

log = logging.getLogger(__name__)

#: What a session runs each poll, with the monitor of the attached connection (a ``QMPMonitor``,
#: or a libvirt domain's: any ``daemon.vmcycle.Monitor``). It may return a
#: ``time.monotonic()`` time for an extra cycle before the next scheduled one.
Cycle = Callable[[Any], Awaitable[float | None]]
Transitions = Mapping[SessionState, frozenset[SessionState]]

S = SessionState
CONNECT_TRANSITIONS: Transitions = {
    S.IDLE: frozenset({S.CONNECTING, S.ATTACHING, S.STOPPED}),  # ATTACHING: listen mode
    S.CONNECTING: frozenset({S.ATTACHING, S.DISCONNECTED, S.STOPPED}),
    S.ATTACHING: frozenset({S.RUNNING, S.DISCONNECTED}),
    S.RUNNING: frozenset({S.DISCONNECTED}),
    S.DISCONNECTED: frozenset({S.BACKOFF, S.ATTACHING, S.STOPPED}),
    S.BACKOFF: frozenset({S.CONNECTING, S.STOPPED}),
    S.STOPPED: frozenset(),
}
# Poll mode has no connection to follow: a VM is running while its last cycle succeeded.
POLL_TRANSITIONS: Transitions = {
    S.IDLE: frozenset({S.RUNNING, S.DISCONNECTED, S.STOPPED}),
    S.RUNNING: frozenset({S.DISCONNECTED, S.STOPPED}),
    S.DISCONNECTED: frozenset({S.RUNNING, S.STOPPED}),
    S.STOPPED: frozenset(),
}
STOPPING_CAUSE = "reclaimd is stopping"
SOCKET_CHECK_INTERVAL = 0.1  # seconds between looks at the socket file while backing off
PUMP_BURST = 16  # events applied before the pump lets other tasks run


async def poll_only(monitor: QMPMonitor) -> float | None:
    """The cycle of a session without a host view: read the monitor."""
    await monitor.poll()
    return None


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half fixed, half random, so VMs spread out."""
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class SessionBase:
    """What every session kind shares: its VM, its state machine, the journal, stopping."""

    TRANSITIONS: ClassVar[Transitions]

    def __init__(
        self, vm: VMState, settings: Settings, journal: Journal, *, cycle: Cycle = poll_only
    ) -> None:
        self.vm = vm
        self.settings = settings
        self.journal = journal
        self.cycle = cycle
        self.transitions: deque[SessionState] = deque([S.IDLE], maxlen=256)
        self._stop = asyncio.Event()

    @property
    def state(self) -> SessionState:
        return self.transitions[-1]

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the session to finish: it closes its connection, records the detach, stops."""
        self._stop.set()

    def _set(self, state: SessionState, error: str | None = None) -> None:
        if state != self.state:
            if state not in self.TRANSITIONS[self.state]:
                raise TransitionError(
                    f"{self.vm.name}: a {type(self).__name__} cannot go from {self.state} "
                    f"to {state}"
                )
            self.transitions.append(state)
        self.vm.set_session_state(state, error)

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep for ``seconds``; True if a stop was requested (at once, or meanwhile)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        return self.stopping

    def _record_attach(self, **data: Any) -> None:
        # Once per attach, not per poll: the log says when a VM came and went, and why.
        log.info("attached VM %s (%s, %s)", self.vm.name, self.vm.attach, self.vm.address)
        record(self.journal, self.vm.name, "attach", "attach", data)

    def _record_detach(self, cause: str) -> None:
        log.info("detached VM %s: %s", self.vm.name, cause)
        record(self.journal, self.vm.name, "detach", "detach", {"cause": cause})

    def _new_connection(self) -> QMPConnection:
        return QMPConnection(self.vm.name, command_timeout=self.settings.command_timeout)

    async def command(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a command on the VM's monitor; ``QMPSessionError`` when it cannot."""
        raise NotImplementedError


class Session(SessionBase):
    """Supervisor of one VM's QMP connection (connect and listen modes)."""

    TRANSITIONS = CONNECT_TRANSITIONS

    def __init__(
        self,
        vm: VMState,
        settings: Settings,
        journal: Journal,
        *,
        address: Address | None = None,
        cycle: Cycle = poll_only,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(vm, settings, journal, cycle=cycle)
        self.address = address
        self._rng = rng or random.Random()
        self._conn: QMPConnection | None = None
        self._attached_before = False
        self._reached_running = False

    # -- connect mode --------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, attach, follow, and reconnect with backoff, until stopped or cancelled."""
        if self.address is None:
            raise ValueError("Session.run needs an address (connect mode)")
        attempt = 0
        try:
            while not self.stopping:
                self._set(S.CONNECTING)
                conn = self._new_connection()
                try:
                    await conn.connect(self.address, self.settings.connect_timeout)
                except ConnectFailed as exc:
                    self._set(S.DISCONNECTED, str(exc))
                else:
                    await self.serve(conn)
                if self.stopping:
                    break
                if self._reached_running:
                    # It attached and ran: what ended it is not a monitor that keeps failing,
                    # so the next attempt comes soon (a restarted QEMU is back in a second).
                    self._reached_running = False
                    attempt = 0
                delay = backoff_delay(
                    attempt, self.settings.backoff_initial, self.settings.backoff_max, self._rng
                )
                attempt += 1
                self._set(S.BACKOFF)
                if await self._back_off(delay) == "replaced":
                    attempt = 0  # another QEMU's socket: start over
        finally:
            self._set(S.STOPPED)

    async def _back_off(self, seconds: float) -> str:
        """Wait ``seconds``, or less: "stopped" when asked to stop, "replaced" when the Unix
        socket was replaced (or appeared) meanwhile, else "waited"."""
        path = self.address.path if self.address is not None else ""
        if not path:
            return "stopped" if await self._sleep_unless_stopped(seconds) else "waited"
        before = _socket_identity(path)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if await self._sleep_unless_stopped(min(left, SOCKET_CHECK_INTERVAL)):
                return "stopped"
            now = _socket_identity(path)
            if now is not None and now != before:
                return "replaced"
        return "waited"

    # -- one connection ------------------------------------------------------------------------

    async def serve(self, conn: QMPConnection) -> str:
        """Attach over an established connection and follow it until it is lost or the session
        is asked to stop. Returns the cause. Cancellation closes the connection and propagates.
        """
        self._conn = conn
        attached = False
        followups = Followups()
        cause = "closed"  # replaced below; kept if cancelled
        if conn.events_dropped:  # dropped before this session took the connection (listen)
            count_dropped(self.vm, conn.events_dropped)
        conn.on_event_dropped = lambda: count_dropped(self.vm)
        try:
            self._set(S.ATTACHING)
            try:
                await probe.attach(conn, self.vm, stats_interval=self.settings.stats_interval)
            except QMPSessionError as exc:
                # A dropped connection explains a failed command better than the command does.
                cause = f"attach failed: {await conn.close() or exc}"
                return cause
            attached = True
            self._on_attached()
            cause = await self._follow(conn, followups)
            return cause
        finally:
            self._conn = None
            await conn.close()
            conn.on_event_dropped = None
            # Events received before the end (until the reader stopped) are history too, also
            # when the attach failed: apply them before the detach is recorded (a SHUTDOWN is
            # often the last thing a QEMU says, and may come while reclaimd is attaching).
            for msg in conn.take_queued_events():
                apply_event(self.vm, msg, self.journal, followups)
            self._set(S.DISCONNECTED, cause)
            if attached:
                self._record_detach(cause)
            if self.stopping and self.address is None:
                self._set(S.STOPPED)  # listen mode has no run loop to do it

    def _on_attached(self) -> None:
        self.vm.attached_at = time.time()
        self._reached_running = True
        if self._attached_before:
            self.vm.reconnects += 1
            QMP_RECONNECTS.labels(self.vm.name).inc()
        self._attached_before = True
        self._set(S.RUNNING)
        self.vm.last_error = None
        self._record_attach(
            mode=self.vm.attach,
            address=self.vm.address,
            qemu_version=self.vm.qemu_version,
            pid=self.vm.pid,
        )

    async def _follow(self, conn: QMPConnection, followups: Followups) -> str:
        monitor = QMPMonitor(conn, self.vm, followups)
        wake = asyncio.Event()

        budget = EventBudget(self.settings.event_rate, self.settings.event_burst)

        async def pump_events() -> None:
            applied = 0
            while True:
                msg = await conn.next_event()
                if budget.take():
                    apply_event(self.vm, msg, self.journal, followups)
                else:
                    drop_event(self.vm, msg, followups)
                if followups.any():
                    wake.set()
                applied += 1
                if applied % PUMP_BURST == 0:
                    # Taking a queued event never suspends: during a flood, let the API and
                    # the other VMs in between.
                    await asyncio.sleep(0)

        async def poll_forever() -> None:
            loop = asyncio.get_running_loop()
            schedule = PollSchedule(self.settings.poll_interval, loop.time())
            while True:
                extra = await self.cycle(monitor)
                stats = self.vm.guest_stats
                due = schedule.advance(
                    loop.time(),
                    stats.age(self.vm.last_poll or time.time()) if stats is not None else None,
                    self.vm.balloon.stats_polling_interval,
                )
                if extra is not None:  # an early cycle; the schedule keeps its deadline
                    due = min(due, loop.time() + max(0.0, extra - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(due):
                        await wake.wait()
                wake.clear()

        stop = asyncio.create_task(self._stop.wait(), name=f"{self.vm.name}-stop")
        tasks = [
            asyncio.create_task(pump_events(), name=f"{self.vm.name}-events"),
            asyncio.create_task(poll_forever(), name=f"{self.vm.name}-poll"),
            asyncio.create_task(conn.wait_lost(), name=f"{self.vm.name}-watch"),
            stop,
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            reason = await conn.close()  # serve() records what the reader queued until here
        if stop in done:
            return STOPPING_CAUSE
        # Prefer the reader's own error (what the peer did) over a command's view of it.
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


def _socket_identity(path: str) -> tuple[int, int, int] | None:
    """What tells the file at ``path`` from the one a new QEMU binds there: device, inode and
    change time (the inode number of a removed socket is soon given to the next file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class PollSession(SessionBase):
    """Poll mode: for a socket another manager also uses. Connect, read, disconnect each cycle."""

    TRANSITIONS = POLL_TRANSITIONS

    def __init__(
        self,
        vm: VMState,
        settings: Settings,
        journal: Journal,
        *,
        address: Address,
        cycle: Cycle = poll_only,
    ) -> None:
        super().__init__(vm, settings, journal, cycle=cycle)
        self.address = address
        self._lock = asyncio.Lock()  # one connection at a time: the socket serves one client

    async def run(self) -> None:
        try:
            while not self.stopping:
                extra = await self.poll_once()
                wait = self.settings.poll_interval
                if extra is not None:
                    wait = min(wait, max(0.0, extra - time.monotonic()))
                await self._sleep_unless_stopped(wait)
            if self.vm.up:
                self._record_detach(STOPPING_CAUSE)
        finally:
            self._set(S.STOPPED)

    async def poll_once(self) -> float | None:
        """One connect-read-disconnect cycle; the VM is up when it succeeded. Returns the
        cycle's wish for an early next one (see ``Cycle``)."""
        was_up = self.vm.up
        try:
            async with self._lock:
                conn = self._new_connection()
                try:
                    await conn.connect(self.address, self.settings.connect_timeout)
                    await probe.attach(conn, self.vm, stats_interval=self.settings.stats_interval)
                    extra = await self.cycle(QMPMonitor(conn, self.vm))
                finally:
                    await conn.close()
        except QMPSessionError as exc:
            self._set(S.DISCONNECTED, str(exc))
            if was_up:
                self._record_detach(str(exc))
            return None
        if not was_up:
            self.vm.attached_at = self.vm.last_poll
            self._record_attach(mode="poll", address=self.vm.address)
        self._set(S.RUNNING)
        self.vm.last_error = None
        return extra

    async def command(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one command on a short-lived connection."""
        async with self._lock:
            conn = self._new_connection()
            try:
                await conn.connect(self.address, self.settings.connect_timeout)
                return await conn.execute(command, arguments)
            finally:
                await conn.close()


__all__ = [
    "CONNECT_TRANSITIONS",
    "POLL_TRANSITIONS",
    "Cycle",
    "PollSession",
    "Session",
    "SessionBase",
    "TransitionError",
    "backoff_delay",
    "poll_only",
]
