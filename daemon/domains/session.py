"""One libvirt domain's session: attach through libvirt, run the poll cycle, reattach.

::

    idle -> attaching -> running -> disconnected -> attaching -> running -> ... -> stopped

A ``LibvirtSession`` shares ``SessionBase`` with the QMP sessions (its VM, the journal, stopping,
the recorded transitions) and has its own table, :data:`LIBVIRT_TRANSITIONS`: there is no
connection of its own to open or back off from, since one libvirt connection serves every
domain (``daemon.libvirt.LibvirtSource``, owned by ``daemon.domains.host``). The session is
running while libvirtd answers and the domain runs; it is disconnected, with the cause, while
libvirtd is away or the domain is stopped, and attaches again (same VM record, same poll cycle,
so the history and the host view's ledger are kept) when both are back. The host tells it
what changed (:meth:`domain_started`, :meth:`domain_stopped`, :meth:`source_changed`,
:meth:`balloon_changed`); none of those waits.

Commands from the API: ``balloon`` is ``setMemoryFlags(..., AFFECT_LIVE)``; nothing else goes
to the domain. QMP passthrough, which taints the domain, is used only with
``libvirt_qmp_passthrough``, and only to read at attach what libvirt cannot tell
(``daemon.domains.passthrough``); the first time for each domain is a warning in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from daemon import libvirt as lv
from daemon.config import Settings
from daemon.domains.agent import LibvirtAgentTransport
from daemon.domains.monitor import LibvirtMonitor, read_domain
from daemon.domains.passthrough import read_through_qmp
from daemon.fleet import SessionState, VMState
from daemon.instruments import QMP_RECONNECTS
from daemon.journal import Journal
from daemon.qmp.errors import CommandFailed, SessionLost
from daemon.qmp.intake import count_event
from daemon.qmp.schedule import PollSchedule
from daemon.qmp.session import STOPPING_CAUSE, Cycle, SessionBase, Transitions, poll_only

log = logging.getLogger(__name__)

S = SessionState
LIBVIRT_TRANSITIONS: Transitions = {
    S.IDLE: frozenset({S.ATTACHING, S.DISCONNECTED, S.STOPPED}),
    S.ATTACHING: frozenset({S.RUNNING, S.DISCONNECTED, S.STOPPED}),
    S.RUNNING: frozenset({S.DISCONNECTED, S.STOPPED}),
    S.DISCONNECTED: frozenset({S.ATTACHING, S.STOPPED}),
    S.STOPPED: frozenset(),
}
#: Seconds before a failed attach of a running domain is tried again.
RETRY_ATTACH = 1.0
NOT_RUNNING = "the domain is not running"


class LibvirtSession(SessionBase):
    """The session of one libvirt domain (see the module docstring)."""

    TRANSITIONS = LIBVIRT_TRANSITIONS

    def __init__(
        self,
        vm: VMState,
        settings: Settings,
        journal: Journal,
        *,
        source: lv.LibvirtSource,
        domain: lv.DomainRef,
        agent: LibvirtAgentTransport | None = None,
        cycle: Cycle = poll_only,
        active: bool = True,
    ) -> None:
        super().__init__(vm, settings, journal, cycle=cycle)
        self.source = source
        self.domain = domain
        self.agent = agent
        self.active = active  # the domain runs, as far as libvirt last said
        vm.uuid = domain.uuid  # known before the first attach (a domain defined, not running)
        self.stopped_cause = NOT_RUNNING
        self._changed = asyncio.Event()  # the domain or the connection changed
        self._wake = asyncio.Event()  # poll now (a balloon change)
        self._attached_before = False
        self._taint_warned = False

    # -- what the host tells ---------------------------------------------------------------------

    def domain_started(self, domain: lv.DomainRef) -> None:
        self.domain = domain
        self.active = True
        self._changed.set()

    def domain_stopped(self, cause: str) -> None:
        self.active = False
        self.stopped_cause = cause
        # Down at once, not at the next poll: the domain's QEMU is gone. (An attach under way
        # finds out itself, and its cycle returns at once.)
        if self.state == S.RUNNING:
            self._set(S.DISCONNECTED, cause)
            self._record_detach(cause)
        elif self.state == S.DISCONNECTED:
            self._set(S.DISCONNECTED, cause)  # a failed call may have said it first, less well
        self._changed.set()

    def source_changed(self) -> None:
        """The libvirt connection was lost or is back."""
        self._changed.set()

    def balloon_changed(self, actual_bytes: int) -> None:
        ram = self.vm.memory.ram_bytes
        if ram is None or actual_bytes <= ram:
            self.vm.balloon.actual_bytes = actual_bytes
            self.vm.balloon.changes += 1
        self._wake.set()

    def event(self, name: str, data: Mapping[str, Any]) -> None:
        """Record a domain event in the journal and the VM's counts."""
        count_event(self.vm, self.journal, name, data, qemu_time=None, at=time.time())

    # -- the session -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self.stopping:
                if not (self.active and self.source.connected):
                    cause = self.stopped_cause if not self.active else self._lost_cause()
                    self._set(S.DISCONNECTED, cause)
                    await self._wait_changed()
                    continue
                self._set(S.ATTACHING)
                domain = self.domain
                try:
                    facts = await read_domain(
                        self.source,
                        domain,
                        self.vm,
                        stats_interval=self.settings.stats_interval,
                        nova=self.settings.libvirt_nova_metadata,
                    )
                    if self.settings.libvirt_qmp_passthrough:
                        await self._passthrough(domain)
                except lv.LibvirtSourceError as exc:
                    self._failed(exc, domain)
                    self._set(S.DISCONNECTED, f"attach failed: {exc}")
                    await self._wait_changed(RETRY_ATTACH)
                    continue
                if self.agent is not None:
                    self.agent.has_channel = facts.agent_channel
                self._on_attached()
                cause = await self._follow()
                if self.state == S.RUNNING:
                    self._set(S.DISCONNECTED, cause)
                    self._record_detach(cause)
        finally:
            if self.state == S.RUNNING:
                self._record_detach(STOPPING_CAUSE)
            self._set(S.STOPPED)

    async def _passthrough(self, domain: lv.DomainRef) -> None:
        """What only QMP tells, through libvirt (see ``daemon.domains.passthrough``)."""
        if not self._taint_warned:
            self._taint_warned = True
            log.warning(
                "%s: QMP passthrough is on: libvirt marks domain %s tainted (custom-monitor)",
                self.vm.name,
                domain.uuid,
            )
        try:
            problems = await read_through_qmp(self.source, domain.uuid, self.vm)
        except lv.Unsupported as exc:  # a driver with no QEMU monitor
            problems = [str(exc)]
        for problem in problems:
            log.info("%s: QMP passthrough: %s", self.vm.name, problem)

    def _lost_cause(self) -> str:
        return f"libvirtd at {self.source.uri} is not connected: {self.source.last_error or '-'}"

    def _failed(self, exc: lv.LibvirtSourceError, domain: lv.DomainRef) -> None:
        """A call on ``domain`` (the instance it was made for) failed."""
        if (
            self.active
            and self.domain is domain
            and isinstance(exc, lv.DomainNotRunning | lv.DomainNotFound)
        ):
            # The lifecycle event says the same, or will, with the detail (destroyed, crashed);
            # unless the domain started again meanwhile (domain_started gave a new instance).
            self.active = False
            self.stopped_cause = str(exc)

    async def _wait_changed(self, timeout: float | None = None) -> None:
        """Until the host reports a change, a stop is asked for, or ``timeout``."""
        stop = asyncio.ensure_future(self._stop.wait())
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({stop, changed}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            stop.cancel()
            changed.cancel()
        self._changed.clear()

    def _on_attached(self) -> None:
        vm = self.vm
        vm.attached_at = time.time()
        if self._attached_before:
            vm.reconnects += 1
            QMP_RECONNECTS.labels(vm.name).inc()
        self._attached_before = True
        self._set(S.RUNNING)
        vm.last_error = None
        self._record_attach(mode="libvirt", address=vm.address, uuid=self.domain.uuid, pid=vm.pid)

    async def _follow(self) -> str:
        """Run the cycle on schedule until the domain stops, libvirtd goes or a stop is asked;
        the cause."""
        domain = self.domain
        monitor = LibvirtMonitor(self.source, domain.uuid, self.vm)
        loop = asyncio.get_running_loop()
        schedule = PollSchedule(self.settings.poll_interval, loop.time())
        self._changed.clear()
        while True:
            if self.stopping:
                return STOPPING_CAUSE
            if not self.active:
                return self.stopped_cause
            if self.domain != domain:  # stopped and started again before this task ran
                return f"{domain.name} was restarted"
            if not self.source.connected:
                return self._lost_cause()
            try:
                extra = await self.cycle(monitor)
            except lv.LibvirtSourceError as exc:
                self._failed(exc, domain)
                return self.stopped_cause if not self.active else str(exc)
            stats = self.vm.guest_stats
            due = schedule.advance(
                loop.time(),
                stats.age(self.vm.last_poll or time.time()) if stats is not None else None,
                self.vm.balloon.stats_polling_interval,
            )
            if extra is not None:
                due = min(due, loop.time() + max(0.0, extra - time.monotonic()))
            await self._until(due)

    async def _until(self, due: float) -> None:
        """Sleep until ``due`` (loop time), or a change, a balloon event or a stop."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, self._changed, self._wake)]
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await asyncio.wait(waits, return_when="FIRST_COMPLETED")
        finally:
            for w in waits:
                w.cancel()
        self._wake.clear()
        self._changed.clear()

    # -- commands from the API -------------------------------------------------------------------

    async def command(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """``balloon`` (``{"value": bytes}``) through libvirt; any other command is refused."""
        if command != "balloon" or arguments is None:
            raise CommandFailed(command, "Unsupported", "not offered for libvirt domains")
        value = arguments.get("value")
        if type(value) is not int:
            raise CommandFailed(command, "InvalidParameter", "value must be an integer")
        if not (self.active and self.state == S.RUNNING):
            raise SessionLost(f"{self.vm.name} is not attached")
        try:
            await self.source.set_balloon_target(self.domain.uuid, value)
        except lv.NotConnected as exc:
            raise SessionLost(str(exc)) from exc
        except lv.LibvirtSourceError as exc:
            raise CommandFailed(command, type(exc).__name__, str(exc)) from exc
        return {}
