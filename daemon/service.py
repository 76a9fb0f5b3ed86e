"""The daemon: the journal, the fleet, and one supervised session per VM.

``Reclaimd.start`` opens the journal and starts the VM sources (static VMs, a watched socket
glob, a listen socket); ``Reclaimd.stop`` shuts down in two phases like uvicorn: stop intake
(no new VMs), then stop sessions, waiting up to a timeout before cancelling what remains.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from daemon.config import Address, AttachMode, Settings
from daemon.fleet import Fleet, VMState
from daemon.journal import Journal
from daemon.ledger.status import HostStatus
from daemon.ledger.tracker import HostTracker
from daemon.qmp.connection import QMPConnection
from daemon.qmp.discovery import SocketWatcher
from daemon.qmp.errors import QMPSessionError
from daemon.qmp.intake import record
from daemon.qmp.listener import Listener
from daemon.qmp.session import PollHook, PollSession, Session

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0


class UnknownVM(LookupError):
    """No VM of that name is known."""


class Reclaimd:
    """Owns everything that is not HTTP. One instance per process."""

    def __init__(self, settings: Settings, *, host_view: bool = True) -> None:
        self.settings = settings
        self.fleet = Fleet()
        self.trackers: dict[str, HostTracker] = {}
        self.scanner: ThreadPoolExecutor | None = None
        self.on_poll: PollHook | None = self._track_host if host_view else None
        self.journal: Journal | None = None
        self.sessions: dict[str, Session | PollSession] = {}
        self._session_tasks: dict[str, asyncio.Task[None]] = {}
        self._intake_tasks: list[asyncio.Task[None]] = []
        self._event_counts: dict[tuple[str, str], int] = {}
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal and start every configured VM source. Raises JournalError."""
        self.journal = Journal(
            self.settings.journal,
            max_events=self.settings.journal_max_events,
            max_age_days=self.settings.journal_max_age_days,
        )
        self._event_counts = self.journal.event_counts()
        # One thread scans for all trackers (see daemon.ledger.tracker for why only one).
        self.scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reclaimd-scan")
        for vm in self.settings.vm:
            self.add_vm(vm.name, Address.parse(vm.address), vm.mode)
        if self.settings.socket_glob:
            watcher = SocketWatcher(
                self.settings.socket_glob,
                appeared=self._socket_appeared,
                vanished=self.remove_vm,
                interval=min(2.0, self.settings.poll_interval),
            )
            self._spawn_intake(watcher.run(), "socket-watcher")
        if self.settings.listen_socket:
            listener = Listener(
                self.settings.listen_socket,
                self.settings,
                self.fleet,
                self.journal,
                register=self._register_listened,
                on_poll=self.on_poll,
            )
            listener.open()
            self._spawn_intake(listener.run(), "qmp-listener")
        self._spawn_intake(self._prune_forever(), "journal-prune")
        self.started = True

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop intake, then sessions (cancelled after ``timeout``), then close the journal."""
        for task in self._intake_tasks:
            task.cancel()
        await asyncio.gather(*self._intake_tasks, return_exceptions=True)
        self._intake_tasks.clear()
        tasks = list(self._session_tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._session_tasks.clear()
        if self.scanner is not None:
            # Let what is queued run out: scans whose views close next, and closes of the views
            # of VMs removed earlier (see HostTracker.close).
            await asyncio.to_thread(self.scanner.shutdown)
            self.scanner = None
        for tracker in self.trackers.values():
            tracker.close()
        self.trackers.clear()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self.started = False

    def _spawn_intake(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._intake_tasks.append(asyncio.create_task(coro, name=name))

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            if self.journal is not None:
                self.journal.prune()

    # -- VMs -----------------------------------------------------------------------------------

    def _track(self, name: str, address: str, mode: AttachMode) -> VMState:
        vm = self.fleet.add(name, address, mode)
        if not vm.event_counts:
            vm.event_counts = {e: n for (v, e), n in self._event_counts.items() if v == name}
        return vm

    def add_vm(self, name: str, address: Address, mode: AttachMode = "connect") -> VMState:
        """Attach a VM at ``address`` (connect or poll mode) and start its session."""
        if self.journal is None:
            raise RuntimeError("Reclaimd.start() first")
        self.remove_vm(name)
        vm = self._track(name, str(address), mode)
        session: Session | PollSession
        if mode == "poll":
            session = PollSession(
                vm, self.settings, self.journal, address=address, on_poll=self.on_poll
            )
        else:
            session = Session(
                vm, self.settings, self.journal, address=address, on_poll=self.on_poll
            )
        self.sessions[name] = session
        self._session_tasks[name] = asyncio.create_task(session.run(), name=f"session-{name}")
        return vm

    def remove_vm(self, name: str) -> None:
        """Stop a VM's session and forget it: it vanishes from the API and metrics."""
        task = self._session_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        self.sessions.pop(name, None)
        tracker = self.trackers.pop(name, None)
        if tracker is not None:
            tracker.close()
        self.fleet.remove(name)

    async def _track_host(self, vm: VMState, conn: QMPConnection | None) -> None:
        tracker = self.trackers.get(vm.name)
        if tracker is None:
            tracker = HostTracker(
                budget=self.settings.scan_budget,
                interval=min(1.0, self.settings.poll_interval),
                scanner=self.scanner,
            )
            self.trackers[vm.name] = tracker
        # The daemon-wide scan budget is shared by all VMs.
        tracker.budget = tracker.cadence.budget = self.settings.scan_budget / max(
            1, len(self.fleet)
        )
        try:
            await tracker.update(vm, conn)
        except (QMPSessionError, asyncio.CancelledError):
            raise  # the session handles its own connection's trouble
        except Exception as exc:
            # A bug in the host view must never cost the VM its QMP session.
            log.exception("host view of %s failed", vm.name)
            vm.host = HostStatus.failed("internal_error", f"{type(exc).__name__}: {exc}")

    def _socket_appeared(self, name: str, path: Path) -> None:
        self.add_vm(name, Address("unix", path=str(path)), self.settings.socket_glob_mode)

    def _register_listened(self, name: str, session: Session) -> None:
        vm = session.vm
        if not vm.event_counts:
            vm.event_counts = {e: n for (v, e), n in self._event_counts.items() if v == name}
        self.sessions[name] = session

    # -- actions -------------------------------------------------------------------------------

    async def set_balloon(self, name: str, target_bytes: int, *, requester: str) -> None:
        """Ask QEMU to move the balloon so the guest has ``target_bytes``; journalled.

        Raises UnknownVM, ValueError (out of bounds) or QMPSessionError (VM not reachable).
        """
        vm = self.fleet.get(name)
        session = self.sessions.get(name)
        if vm is None or session is None:
            raise UnknownVM(name)
        ram = vm.memory.ram_bytes
        if ram is None:
            raise QMPSessionError(f"{name}: RAM size not known yet")
        if not 0 < target_bytes <= ram:
            raise ValueError(f"target {target_bytes} outside 1..{ram} (the VM's RAM)")
        if not vm.balloon.present:
            raise QMPSessionError(f"{name}: no virtio-balloon device")
        assert self.journal is not None
        data = {"target_bytes": target_bytes, "requester": requester}
        try:
            await session.command("balloon", {"value": target_bytes})
        except QMPSessionError as exc:
            record(self.journal, name, "request", "balloon", {**data, "error": str(exc)})
            raise
        vm.balloon.target_bytes = target_bytes
        record(self.journal, name, "request", "balloon", data)
