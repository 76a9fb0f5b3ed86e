"""The daemon: the journal, the fleet, and one supervised session with its poll cycle per VM.

``Reclaimd.start`` opens the journal (recording a detach for every VM a previous process left
attached: it died without detaching them) and starts the VM sources (static VMs, a watched socket
glob, a listen socket). ``Reclaimd.stop`` shuts down in two phases like uvicorn: stop intake (no
new VMs), then ask every session to stop (each closes its connection and records its detach),
wait for them up to a timeout, and cancel only what has not finished by then.

The API reads the fleet, asks for a VM's journal through ``events`` and changes a VM only
through ``set_balloon``, which refuses to squeeze a guest below what it uses (``balloon_floor``)
unless told to; it never sees a session or a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.agent import AgentReader, AgentTransport, SocketTransport
from daemon.config import Address, AttachMode, Settings
from daemon.fleet import AttachKind, Fleet, VMOptions, VMState
from daemon.host.meminfo import host_memory_use
from daemon.instruments import QMP_EVENTS_DROPPED, QMP_RECONNECTS, RECLAIM_ACTIONS
from daemon.journal import Journal, JournalEntry
from daemon.ledger.advice import used_bytes
from daemon.ledger.estimate import margin_for
from daemon.ledger.reclaim import Decision, ReclaimController, ReclaimPolicy
from daemon.proxmox import ProxmoxVM, ProxmoxWatcher
from daemon.qmp.discovery import SocketWatcher
from daemon.qmp.errors import CommandFailed, QMPSessionError
from daemon.qmp.intake import fold_event_counts, record
from daemon.qmp.listener import Listener
from daemon.qmp.session import Cycle, PollSession, Session, SessionBase, poll_only
from daemon.untrusted import vm_name
from daemon.vmcycle import AGENT_DRIFT_EVERY, VMCycle

if TYPE_CHECKING:
    # Imported when a libvirt URI is configured: the binding is an optional extra.
    from daemon import libvirt as lv
    from daemon.domains import LibvirtSession

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0
AGENT_READS_PER_SECOND = 20.0  # guest agent reads that moving memory asks for, daemon-wide
RESTARTED_CAUSE = "reclaimd restarted without detaching (the previous process died)"
#: Guest statistics older than this say nothing about the memory the guest uses now.
STATS_MAX_AGE = 60.0
#: How long a page of events waits for the VM's entries to be committed at most.
EVENTS_WAIT = 5.0
MiB = 1 << 20


class UnknownVM(LookupError):
    """No VM of that name is known."""


class VMUnavailable(Exception):
    """The VM cannot take the request now (not attached, no balloon, QEMU refused)."""


class BelowFloor(ValueError):
    """A balloon target below what the guest needs (see ``Reclaimd.balloon_floor``)."""


class Reclaimd:
    """Owns everything that is not HTTP. One instance per process."""

    def __init__(self, settings: Settings, *, host_view: bool = True) -> None:
        self.settings = settings
        self.host_view = host_view
        self.fleet = Fleet()
        self.scanner: ThreadPoolExecutor | None = None
        self.journal: Journal | None = None
        self.sessions: dict[str, SessionBase] = {}
        self._cycles: dict[str, VMCycle] = {}
        self._moving = 0  # VMs whose host view moved at their last look (see _scan_budget_share)
        self._moving_counted_at = -1.0
        self._session_tasks: dict[str, asyncio.Task[None]] = {}
        self._intake_tasks: list[asyncio.Task[None]] = []
        self._listener: Listener | None = None
        self._libvirt: lv.LibvirtSource | None = None
        self.started = False
        self.reclaim = ReclaimController(
            ReclaimPolicy(
                step_bytes=settings.reclaim_step_bytes,
                cooldown_seconds=settings.reclaim_cooldown,
                host_target=settings.reclaim_host_target,
            )
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal and start every configured VM source. Raises JournalError or
        OSError (the listen socket); what was started by then is stopped again."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self.journal = Journal(
            self.settings.journal,
            max_events=self.settings.journal_max_events,
            max_age_days=self.settings.journal_max_age_days,
        )
        # Before any session attaches: the attaches still open are the dead process's.
        dangling = self.journal.close_dangling_attaches(RESTARTED_CAUSE)
        if dangling:
            log.warning(
                "journal: %d VMs were left attached by a previous reclaimd that did not stop "
                "cleanly; recorded their detach (%s)",
                len(dangling),
                ", ".join(dangling[:10]) + (", ..." if len(dangling) > 10 else ""),
            )
        # One thread scans for all VMs (see daemon.vmcycle for why only one).
        self.scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reclaimd-scan")
        for vm in self.settings.vm:
            self.add_vm(vm.name, Address.parse(vm.address), vm.mode, pid=vm.pid, agent=vm.agent)
        if self.settings.socket_glob:
            watcher = SocketWatcher(
                self.settings.socket_glob,
                appeared=self._socket_appeared,
                vanished=self.remove_vm,
                interval=min(2.0, self.settings.poll_interval),
            )
            self._spawn_intake(watcher.run(), "socket-watcher")
        if self.settings.listen_socket:
            self._listener = Listener(
                self.settings.listen_socket,
                self.settings,
                self.fleet,
                session_for=self._listened_session,
                journal=self.journal,
            )
            self._listener.open()
            self._spawn_intake(self._listener.run(), "qmp-listener")
        if self.settings.libvirt:
            await self._start_libvirt(self.settings.libvirt)
        if self.settings.proxmox is not None:
            proxmox = ProxmoxWatcher(
                self.settings.proxmox,
                appeared=self._proxmox_appeared,
                vanished=self.remove_vm,
                interval=min(2.0, self.settings.poll_interval),
            )
            self._spawn_intake(proxmox.run(), "proxmox-watcher")
        self._spawn_intake(self._prune_forever(), "journal-prune")
        if self.host_view:  # advice comes from the poll cycle's estimate
            self._spawn_intake(self._reclaim_forever(), "reclaim")
        self.started = True

    async def _start_libvirt(self, uri: str) -> None:
        """Connect to libvirtd (in the background) and follow its domains."""
        from daemon import libvirt as lv
        from daemon.domains import LibvirtHost

        self._libvirt = lv.LibvirtSource(
            uri,
            call_timeout=self.settings.command_timeout,
            connect_timeout=self.settings.connect_timeout,
            # libvirtd restarts in a second or two: look again soon, and at least every 2 s.
            backoff_initial=min(0.25, self.settings.backoff_initial),
            backoff_max=min(2.0, self.settings.backoff_max),
        )
        await self._libvirt.start()
        host = LibvirtHost(
            self._libvirt,
            appeared=lambda domain, active: self._libvirt_appeared(uri, domain, active),
            vanished=self.remove_vm,
        )
        self._spawn_intake(host.run(), "libvirt-host")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop intake; ask every session to stop and wait up to ``timeout`` for them, then
        cancel what remains; close the host views and the journal."""
        for task in self._intake_tasks:
            task.cancel()
        await asyncio.gather(*self._intake_tasks, return_exceptions=True)
        self._intake_tasks.clear()
        for session in self.sessions.values():
            session.request_stop()
        tasks = list(self._session_tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_served(timeout)
            self._listener = None
        self._session_tasks.clear()
        if self._libvirt is not None:  # after the sessions: they record their detach first
            await self._libvirt.close()
            self._libvirt = None
        if self.scanner is not None:
            # Let what is queued run out: scans whose views close next, and closes of the views
            # of VMs removed earlier (see VMCycle.close).
            await asyncio.to_thread(self.scanner.shutdown)
            self.scanner = None
        for cycle in self._cycles.values():
            cycle.close()
        self._cycles.clear()
        if self.journal is not None:
            # Commits what the sessions recorded last (their detaches), off the event loop.
            await asyncio.to_thread(self.journal.close)
            self.journal = None
        self.started = False

    def _spawn_intake(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._intake_tasks.append(asyncio.create_task(coro, name=name))

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            if self.journal is not None:
                await asyncio.to_thread(self.journal.prune)

    # -- VMs -----------------------------------------------------------------------------------

    def _journal(self) -> Journal:
        if self.journal is None:
            raise RuntimeError("Reclaimd.start() first")
        return self.journal

    def _track(self, name: str, address: str, attach: AttachKind) -> VMState:
        """The VM's fleet record, with its event counts from the journal when it is new."""
        known = self.fleet.get(name)
        vm = self.fleet.add(name, address, attach)
        if vm is not known:
            # Within the per-VM bound of names, also for a journal written before there was one.
            vm.event_counts = fold_event_counts(self._journal().event_counts(name))
        return vm

    def _cycle(
        self, vm: VMState, agent: str | None = None, transport: AgentTransport | None = None
    ) -> Cycle:
        """The VM's poll cycle: with the host view, or only reading the monitor. ``agent`` is
        the guest agent's address when configured for this VM; ``transport`` another way to
        its agent (libvirt's)."""
        if not self.host_view:
            return poll_only
        cycle = self._cycles.get(vm.name)
        if cycle is None or cycle.vm is not vm:
            if cycle is not None:
                cycle.close()
            path = self._agent_path(vm, agent)
            reader = None
            if transport is not None and self.settings.agents:
                path = f"{vm.attach}:{vm.name}"  # where the agent is reached, for people
                reader = AgentReader(transport, name=vm.name)
            elif path is not None:
                reader = AgentReader(SocketTransport(path, name=f"{vm.name} agent"), name=vm.name)
            cycle = VMCycle(
                vm,
                budget=self._scan_budget_share,
                interval=min(1.0, self.settings.poll_interval),
                scanner=self.scanner,
                agent=reader,
                agent_path=path or "",
                agent_refresh=self.settings.agent_refresh,
                agent_spacing=self._agent_spacing,
                minimum=lambda: self._configured_floor(vm),
            )
            self._cycles[vm.name] = cycle
        return cycle

    def _agent_path(self, vm: VMState, configured: str | None) -> str | None:
        """Where the VM's guest agent listens: configured, or the first of the places the
        ``agent_socket`` setting (or, unset, ``SOCKET.qga`` and ``DIR/NAME.qga``) names that is
        a socket now. None: the VM has no agent reclaimd knows of."""
        if not self.settings.agents:
            return None
        if configured is not None:
            return Address.parse(configured).path
        socket = vm.address.removeprefix("unix:") if vm.address.startswith("unix:") else ""
        fields = {"name": vm.name, "socket": socket, "dir": str(Path(socket).parent)}
        templates = (
            [self.settings.agent_socket]
            if self.settings.agent_socket
            else ["{socket}.qga", "{dir}/{name}.qga"]
        )
        for template in templates:
            if not socket and ("{socket}" in template or "{dir}" in template):
                continue  # listen mode or TCP: no socket to find the agent beside
            path = Path(template.format(**fields))
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.stat().st_mode):
                    return str(path)
        return None

    def _agent_spacing(self) -> float:
        # Reads that moving memory asks for, daemon-wide at most AGENT_READS_PER_SECOND: a read
        # costs the daemon about 2.5 ms (500 VMs, all with agents: 19 % of a core more than
        # without), so a busy fleet's reads stay near 5 % of a core.
        return max(AGENT_DRIFT_EVERY, len(self.fleet) / AGENT_READS_PER_SECOND)

    def _scan_budget_share(self) -> float:
        # The daemon-wide scan budget is shared by the VMs whose host view moves: the others
        # are looked at without a scan (VMCycle), for next to nothing. Counted once a second.
        now = time.monotonic()
        if now - self._moving_counted_at >= 1.0:
            self._moving_counted_at = now
            self._moving = sum(1 for c in self._cycles.values() if c.moving)
        return self.settings.scan_budget / max(1, self._moving)

    def add_vm(
        self,
        name: str,
        address: Address,
        mode: AttachMode = "connect",
        *,
        pid: int | None = None,
        agent: str | None = None,
    ) -> VMState:
        """Attach a VM at ``address`` (connect or poll mode) and start its session. ``pid`` is
        QEMU's, for the host view where the socket cannot tell it (TCP); ``agent`` the guest
        agent's socket (``unix:/path``)."""
        journal = self._journal()
        self.remove_vm(name)
        vm = self._track(name, str(address), mode)
        vm.pid = pid
        for configured in self.settings.vm:  # a [[vm]] of that name says how to reclaim it
            if configured.name == name:
                vm.options = VMOptions(configured.reclaim, configured.balloon_min_bytes, "config")
        kind = PollSession if mode == "poll" else Session
        session = kind(vm, self.settings, journal, address=address, cycle=self._cycle(vm, agent))
        self.sessions[name] = session
        self._session_tasks[name] = asyncio.create_task(session.run(), name=f"session-{name}")
        return vm

    def remove_vm(self, name: str) -> None:
        """Stop a VM's session and forget it: it vanishes from the API and metrics."""
        task = self._session_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        self.sessions.pop(name, None)
        cycle = self._cycles.pop(name, None)
        if cycle is not None:
            cycle.close()
        self.reclaim.forget(name)
        self.fleet.remove(name)
        for series in (QMP_RECONNECTS, QMP_EVENTS_DROPPED):
            with contextlib.suppress(KeyError):
                series.remove(name)

    def _socket_appeared(self, name: str, path: Path) -> None:
        self.add_vm(name, Address("unix", path=str(path)), self.settings.socket_glob_mode)

    def _proxmox_appeared(self, vm: ProxmoxVM) -> None:
        self.add_vm(vm.name, Address("unix", path=str(vm.qmp_socket)), "poll", pid=vm.pid)

    def _libvirt_appeared(self, uri: str, domain: lv.DomainRef, active: bool) -> LibvirtSession:
        """A session for a libvirt domain the host has no VM for (see daemon.domains.host)."""
        from daemon.domains import LibvirtAgentTransport, LibvirtSession

        assert self._libvirt is not None
        name = vm_name(domain.name) or domain.uuid
        self.remove_vm(name)
        vm = self._track(name, f"libvirt:{uri}", "libvirt")
        transport = LibvirtAgentTransport(self._libvirt, domain.uuid)
        session = LibvirtSession(
            vm,
            self.settings,
            self._journal(),
            source=self._libvirt,
            domain=domain,
            agent=transport,
            cycle=self._cycle(vm, transport=transport),
            active=active,
        )
        self.sessions[name] = session
        self._session_tasks[name] = asyncio.create_task(session.run(), name=f"session-{name}")
        return session

    def _listened_session(self, name: str) -> Session:
        """The session of a VM that connected to the listen socket: new on its first connection,
        the same one when that QEMU reconnects."""
        vm = self._track(name, f"listen:{self.settings.listen_socket}", "listen")
        session = self.sessions.get(name)
        if not isinstance(session, Session) or session.vm is not vm:
            session = Session(vm, self.settings, self._journal(), cycle=self._cycle(vm))
            self.sessions[name] = session
        return session

    # -- the reclaim controller (daemon.ledger.reclaim decides; this carries it out) ----------

    async def _reclaim_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            await self.reclaim_once(host_memory_use())

    async def reclaim_once(self, host_use: float | None) -> list[Decision]:
        """One controller cycle over every VM: act (``--reclaim act``) or log what it would do.
        Returns the decisions that change a balloon."""
        now, acting = time.time(), self.settings.reclaim == "act"
        changes = []
        for vm in list(self.fleet):
            if not vm.up or not vm.balloon.present:
                continue
            stats = vm.guest_stats
            decision = self.reclaim.decide(
                vm.name,
                vm.advice,
                now=now,
                ram_bytes=vm.memory.ram_bytes,
                actual_bytes=vm.balloon.actual_bytes,
                available_bytes=stats.available_bytes if stats is not None else None,
                margin_bytes=margin_for(vm.memory.ram_bytes),
                deflate_on_oom=vm.balloon.deflate_on_oom is True,
                host_use=host_use,
                opted_out=not vm.options.reclaim,
            )
            if decision.target_bytes is None:
                continue
            changes.append(decision)
            if not acting:
                log.info(
                    "reclaim (advise, not acting): would %s %s to %s: %s; inputs %s",
                    decision.action, vm.name, _mib(decision.target_bytes), decision.reason,
                    decision.inputs,
                )  # fmt: skip
                self.reclaim.done(decision, now, applied=False)
                continue
            note = {"reason": decision.reason, "action": decision.action, **decision.inputs}
            try:
                # A deflation gives the guest memory: never refused for the floor.
                await self.set_balloon(
                    vm.name,
                    decision.target_bytes,
                    requester="reclaim-controller",
                    force=decision.action == "deflate",
                    note=note,
                )
            except (ValueError, VMUnavailable, UnknownVM) as exc:
                log.warning("reclaim: %s %s failed: %s", decision.action, vm.name, exc)
                RECLAIM_ACTIONS.labels(decision.action, "failed").inc()
                continue
            RECLAIM_ACTIONS.labels(decision.action, decision.reason).inc()
            self.reclaim.done(decision, now)
        return changes

    # -- reads and actions for the API -----------------------------------------------------

    async def events(
        self, name: str, *, since: float | None, before_id: int | None, limit: int
    ) -> list[JournalEntry]:
        """A page of the VM's journal, newest first (the API's one way into the journal).

        It includes everything recorded for the VM before the call (a balloon request just
        made, the events already applied to its record): when the VM has entries not yet
        committed, the page waits for them off the event loop, which only a flooding VM's
        pages ever do, for a group commit.
        """
        journal = self._journal()
        last = journal.last_submitted(name)
        if last > journal.acknowledged_id:
            await asyncio.to_thread(journal.wait_acknowledged, last, EVENTS_WAIT)
        return journal.entries(name, since=since, before_id=before_id, limit=limit)

    def balloon_floor(self, vm: VMState) -> tuple[int | None, str]:
        """The lowest balloon target that leaves the guest what it needs, and how it was found.

        With the guest's statistics (valid, at most STATS_MAX_AGE old): its used memory
        (total - available, less the balloon where deflate-on-oom counts it as used) plus the
        estimate's margin (5 % of RAM, at least 64 MiB), and at least the configured minimum.
        Without them: the configured minimum (the VM's ``balloon_min_bytes``, else the
        daemon's). None when there is neither: nothing tells how low is safe.
        """
        configured = self._configured_floor(vm)
        stats, ram = vm.guest_stats, vm.memory.ram_bytes
        age = stats.age(time.time()) if stats is not None else None
        usable = (
            stats is not None
            and stats.valid
            and stats.total_bytes is not None
            and stats.available_bytes is not None
            and age is not None
            and age <= STATS_MAX_AGE
        )
        if not usable or stats is None:
            why = vm.guest_stats_error or "no guest statistics"
            if stats is not None and stats.valid and age is not None and age > STATS_MAX_AGE:
                why = f"the guest's statistics are {age:.0f} s old"
            if configured is None:
                return None, f"{why}, and no balloon_min_bytes is configured"
            return configured, f"the configured minimum ({why})"
        assert stats.total_bytes is not None and stats.available_bytes is not None
        doom = vm.balloon.deflate_on_oom is True and ram is not None
        used = used_bytes(
            stats.total_bytes, stats.available_bytes, ram or 0, vm.balloon.actual_bytes, doom
        )
        margin = margin_for(ram)
        floor = used + margin
        how = f"the guest's used memory ({_mib(used)}) plus the margin ({_mib(margin)})"
        if configured is not None and configured > floor:
            return configured, f"the configured minimum (above {how})"
        return floor, how

    def _configured_floor(self, vm: VMState) -> int | None:
        """The VM's own minimum (config or libvirt metadata), else the daemon's."""
        if vm.options.minimum_bytes is not None:
            return vm.options.minimum_bytes
        return self.settings.balloon_min_bytes

    async def set_balloon(
        self,
        name: str,
        target_bytes: int,
        *,
        requester: str,
        force: bool = False,
        note: dict[str, object] | None = None,
    ) -> None:
        """Ask QEMU to move the balloon so the guest has ``target_bytes``; journalled.

        Raises UnknownVM; ValueError for a target that is not an integer in 1..RAM, and
        BelowFloor (a ValueError) for one below ``balloon_floor`` unless ``force``;
        VMUnavailable when the VM cannot take it. ``note`` goes to the journal with the request
        (the controller's reason and inputs).
        """
        if type(target_bytes) is not int:  # JSON true is an int to Python: not a size
            raise ValueError(f"target_bytes must be an integer, not {type(target_bytes).__name__}")
        vm = self.fleet.get(name)
        session = self.sessions.get(name)
        if vm is None or session is None:
            raise UnknownVM(name)
        ram = vm.memory.ram_bytes
        if ram is None:
            raise VMUnavailable(f"{name}: RAM size not known yet")
        if not 0 < target_bytes <= ram:
            raise ValueError(f"target {target_bytes} outside 1..{ram} (the VM's RAM)")
        if not vm.balloon.present:
            raise VMUnavailable(f"{name}: no virtio-balloon device")
        floor, how = self.balloon_floor(vm)
        if not force and (floor is None or target_bytes < floor):
            if floor is None:
                raise BelowFloor(
                    f"cannot tell how low {name} can go: {how}; send force to override"
                )
            raise BelowFloor(
                f"send force to go below {_mib(floor)}: target {_mib(target_bytes)} would leave "
                f"the guest short of memory ({how})"
            )
        journal = self._journal()
        data: dict[str, object] = {"target_bytes": target_bytes, "requester": requester}
        data.update(note or {})
        if force:
            data.update(force=True, floor_bytes=floor)
        try:
            await session.command("balloon", {"value": target_bytes})
        except QMPSessionError as exc:
            record(journal, name, "request", "balloon", {**data, "error": str(exc)})
            if isinstance(exc, CommandFailed):
                raise VMUnavailable(f"QEMU refused: {exc}") from exc
            raise VMUnavailable(str(exc)) from exc
        vm.balloon.target_bytes = target_bytes
        record(journal, name, "request", "balloon", data)


def _mib(n: int) -> str:
    return f"{n} bytes ({n / MiB:.0f} MiB)" if n >= MiB else f"{n} bytes"
