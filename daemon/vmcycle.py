"""One VM's poll cycle, in one place: poll the monitor, scan, read the balloon, observe, estimate,
publish.

A session (``daemon.qmp``; ``daemon.libvirt`` next) calls its VM's ``VMCycle`` on schedule with
the VM's ``Monitor``. The cycle:

1. polls the monitor (balloon, guest stats, what events asked to re-read);
2. scans residency, when the scan cadence says one is due, on the scanner thread;
3. reads the balloon again after the scan: the ledger needs the balloon's size from after the
   scan to tell a balloon inflation from reported pages (see ``daemon.ledger.ranges``);
4. lets the ledger observe the scan, reconciles the free split (with the guest's own free lists
   when its agent answers: a read runs as its own task, started when the guest's free memory
   moved or every ``agent_refresh`` seconds, and waited for briefly), and estimates;
5. publishes ``VMState.host`` (a ``HostStatus``), ``VMState.estimate`` and ``VMState.ranges``.

Trouble with the monitor propagates to the session, which owns the connection. Trouble with the
host view (``/proc`` permissions, a vanished process) is published as the VM's host problem, and
a bug in the host view or ledger is logged and published too: neither ever costs a VM its
session.

The daemon gives all VMs one scanner thread: a scan is mostly Python holding the GIL, so more
threads would not scan faster, only take the GIL from the event loop more often. The CPU budget
is charged with everything a scan costs on that thread (reading maps, checks, the scan itself),
not only the syscalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol

from daemon.agent import AgentProblem, FreeLists
from daemon.fleet import MAX_ERROR, AgentStatus, VMState
from daemon.guest_stats import GuestStats
from daemon.host.cadence import ScanCadence
from daemon.host.mtree import GuestPhysMap
from daemon.host.unavailable import Unavailable
from daemon.host.view import GuestRamScan, HostView
from daemon.instruments import RESIDENCY_SCAN_SECONDS
from daemon.ledger.advice import PressureWatch, advise
from daemon.ledger.estimate import estimate
from daemon.ledger.ranges import Ledger, LedgerSummary
from daemon.ledger.reconcile import AgentSplit, FreeState, Moment, Reconciler
from daemon.ledger.status import HostStatus
from daemon.model import PAGE_SIZE
from daemon.untrusted import one_line

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY = 10.0  # seconds before retrying a host view that failed
AGENT_ALIGNED = 3.0  # seconds: an agent read this close to the stats' moment is of it
REPORT_LOOK_AFTER = 0.3  # seconds after a predicted report that the host looks
REPORT_LOOK_EVERY = 1.0  # and then every this many seconds
REPORT_LOOK_WINDOW = 6.0  # for this long after it (a pass or two late is "slow")
MAX_REPORT_WAIT = 30.0  # a prediction further ahead is looked at on the schedule
FULL_SCAN_EVERY = 60.0  # seconds: a scan at least this often, even of a view that looks unchanged
_closing: set[asyncio.Task[None]] = set()  # agent closes in flight, kept from the collector


class Monitor(Protocol):
    """What the cycle needs of a VM's monitor; it writes what it reads into the VM's record."""

    @property
    def connected(self) -> bool: ...

    async def poll(self) -> None:
        """Read what changes between polls: balloon, guest stats, and what events flagged."""

    async def read_balloon(self) -> None:
        """Read the balloon's ``actual`` again."""


AGENT_WAIT = 0.25  # seconds a cycle waits for the agent read it started; later, the next uses it
AGENT_MOVED = 0.01  # of RAM: a change of free memory that is worth a new agent read
AGENT_MOVED_MIN = 2 << 20  # bytes: and never less (a read costs a few round trips)
AGENT_DRIFT_EVERY = 2.0  # seconds between agent reads while the split drifts (a stats push)
STATS_MOVED = 0.01  # of RAM: a change of free memory that makes a scan due at once


class AgentSource(Protocol):
    """The guest agent's reader (``daemon.agent.AgentReader``)."""

    async def read(self, ram_bytes: int) -> FreeLists | AgentProblem: ...

    async def close(self) -> None: ...


class VMCycle:
    """The poll cycle of one VM, with the state it keeps between cycles: the host view, the
    ledger, the scan cadence and what the estimate carries over."""

    def __init__(
        self,
        vm: VMState,
        *,
        budget: Callable[[], float],
        interval: float = 1.0,
        scanner: Executor | None = None,
        agent: AgentSource | None = None,
        agent_path: str = "",
        agent_refresh: float = 60.0,
        agent_spacing: Callable[[], float] = lambda: AGENT_DRIFT_EVERY,
        minimum: Callable[[], int | None] = lambda: None,
    ) -> None:
        """``budget()`` is this VM's share of the scan budget now (CPU-seconds per second);
        ``scanner`` runs the scans (None: asyncio's default executor); ``agent`` reads the
        guest's free lists (at ``agent_path``), None when the VM has no agent;
        ``minimum()`` is the configured minimum the balloon advice respects (asked each cycle:
        a libvirt domain's metadata can change it)."""
        self.vm = vm
        self.minimum = minimum
        self.pressure = PressureWatch()
        self.budget = budget
        self.scanner = scanner
        self.view: HostView | None = None
        self.ledger = Ledger()
        self.cadence = ScanCadence(budget=budget(), interval=interval, idle_interval=4 * interval)
        self.problem: Unavailable | None = None
        self.reconciler = Reconciler()
        self.free: FreeState | None = None
        self._moment_key: tuple[Any, ...] | None = None
        self._touched = 0  # the ledger's refaults and first touches, as last replayed
        self._free_at_scan: int | None = None  # the guest's free memory at the last scan
        self.agent = agent
        self.agent_path = agent_path
        self.agent_refresh = agent_refresh
        self.agent_spacing = agent_spacing  # seconds at least between reads memory asked for
        self.free_lists: FreeLists | None = None  # the agent's last good read
        self._agent_task: asyncio.Task[FreeLists | AgentProblem] | None = None
        self._agent_asked: tuple[float, int] | None = None  # (monotonic, free bytes) of the last
        self._key: tuple[Any, ...] | None = None
        self._next_scan = 0.0  # when the cadence (or a report due) wants the next scan
        self._cpu_seconds = 0.0  # of the last scan
        self._scanned_at = -FULL_SCAN_EVERY  # time.monotonic() of the last scan
        # Whether the host view moved at the last look (see _scan_if_due): the daemon shares
        # the scan budget among the VMs that move.
        self.moving = True
        vm.ranges = self.ledger.history

    async def __call__(self, monitor: Monitor) -> float | None:
        """Run one cycle (see the module docstring). Returns when (``time.monotonic()``) a
        cycle should run before the next one the schedule has: just after upstream is due to
        have reported what the guest freed, so the host sees it then."""
        await monitor.poll()
        await self._read_agent()
        try:
            scan = await self._scan_if_due()
        except Exception as exc:
            self._failed(exc)
            return None
        if scan is not None and monitor.connected:
            await monitor.read_balloon()
        try:
            self._observe(scan)
            self._publish()
        except Exception as exc:
            self._failed(exc)
            return None
        return self._look_when_due()

    def _look_when_due(self) -> float | None:
        """Scan when a predicted report is due, and each second for a few seconds after,
        whatever the cadence says: so the host sees the report when it happens."""
        due = self.free.report_due_at if self.free is not None else None
        if due is None:
            return None
        now = time.time()
        if now > due + REPORT_LOOK_WINDOW or due - now > MAX_REPORT_WAIT:
            return None
        after = due - now + REPORT_LOOK_AFTER if now < due else REPORT_LOOK_EVERY
        at = max(time.monotonic() + after, self._earliest_scan())
        if at - time.monotonic() > due - now + REPORT_LOOK_WINDOW:
            return None  # the budget allows no look in the window: the schedule's scan will do
        self._next_scan = min(self._next_scan, at)
        return at

    def _failed(self, exc: Exception) -> None:
        # A bug in the host view or ledger must never cost the VM its monitor session.
        log.exception("host view of %s failed", self.vm.name, exc_info=exc)
        self.vm.host = HostStatus.failed(
            "internal_error", one_line(f"{type(exc).__name__}: {exc}", MAX_ERROR)
        )

    def close(self) -> None:
        """The VM is gone: stop an agent read in flight, close the agent, drop the view."""
        if self._agent_task is not None:
            self._agent_task.cancel()
            self._agent_task = None
        if self.agent is not None:
            with contextlib.suppress(RuntimeError):  # no event loop left: nothing to close
                task = asyncio.get_running_loop().create_task(self.agent.close())
                _closing.add(task)
                task.add_done_callback(_closing.discard)
        self._drop_view()

    def _drop_view(self) -> None:
        """Drop the view; its descriptors are closed on the scanner, after any scan in flight.

        A scan may still run on the view (its VM was removed, or the cycle awaiting it was
        cancelled): closing from here could close descriptors under it, or leave the ones it
        opens next open for ever.
        """
        view, self.view = self.view, None
        if view is None:
            return
        try:
            if self.scanner is not None:
                self.scanner.submit(view.close)
                return
        except RuntimeError:
            pass  # the scanner is shut down: no scan runs any more
        view.close()

    # -- the steps -----------------------------------------------------------------------------

    async def _read_agent(self) -> None:
        """Start an agent read when one is due, and take its result when it is done."""
        if self.agent is None:
            return
        vm = self.vm
        ram, stats = vm.memory.ram_bytes, vm.guest_stats
        if self._agent_task is None and ram and self._agent_due(ram):
            free = stats.free_bytes if stats is not None and stats.free_bytes else 0
            self._agent_asked = (time.monotonic(), free)
            self._agent_task = asyncio.get_running_loop().create_task(self.agent.read(ram))
        task = self._agent_task
        if task is None:
            return
        if not task.done():
            await asyncio.wait({task}, timeout=AGENT_WAIT)
            if not task.done():
                return  # a slow or hung agent: the read goes on, bounded by its own budget
        self._agent_task = None
        result = task.result()
        if isinstance(result, FreeLists):
            self.free_lists = result
            vm.agent = AgentStatus(
                self.agent_path,
                True,
                result.at,
                reporting_order=result.reporting_order,
                free_by_order_bytes=tuple(p * PAGE_SIZE for p in result.by_order_pages),
            )
        else:
            vm.agent = AgentStatus(self.agent_path, False, result.at, result.kind, result.reason)

    def _agent_due(self, ram: int) -> bool:
        if self._agent_asked is None:
            return True
        asked, free_then = self._agent_asked
        stats = self.vm.guest_stats
        free = stats.free_bytes if stats is not None and stats.free_bytes else 0
        worth = max(AGENT_MOVED * ram, AGENT_MOVED_MIN)
        moved = abs(free - free_then) >= worth
        since = time.monotonic() - asked
        # The guest's free lists moved under a steady free total (a busy allocator): the model
        # drifted by the last read's residual, so read again each poll while it does.
        residual = self.free.residual_pages if self.free is not None else None
        drifting = residual is not None and residual * PAGE_SIZE >= worth
        if since >= self.agent_refresh:
            return True
        return (moved or drifting) and since >= self.agent_spacing()

    async def _scan_if_due(self) -> GuestRamScan | None:
        """Scan when the cadence says so, or when the guest's free memory moved since the
        last scan: stats of a moment want the host view of that moment."""
        view = self._ensure_view()
        stats = self.vm.guest_stats
        free = stats.free_bytes if stats is not None and stats.valid else None
        ram = self.vm.memory.ram_bytes or 0
        moved = (
            free is not None
            and self._free_at_scan is not None
            and abs(free - self._free_at_scan) >= STATS_MOVED * ram
        )
        now = time.monotonic()
        if self.ledger.scans and view.unchanged():
            # Nothing moved since the last scan: the view is as fresh as this look, for a few
            # syscalls. Idle VMs cost next to nothing that way and leave the scan budget to
            # the ones that move; a scan now and then catches what the look cannot tell.
            self.moving = False
            if now - self._scanned_at < FULL_SCAN_EVERY:
                self.ledger.confirm(time.time())
                return None
        else:
            self.moving = True
        earliest = self._earliest_scan()
        if now < max(self._next_scan, earliest) and not (moved and now >= earliest):
            return None
        self._free_at_scan = free
        loop = asyncio.get_running_loop()
        result, cpu_seconds = await loop.run_in_executor(self.scanner, _timed_scan, view)
        if isinstance(result, Unavailable):
            self.problem = result
            self._next_scan = time.monotonic() + UNAVAILABLE_RETRY
            return None
        self.problem = None
        self._cpu_seconds = cpu_seconds
        self._scanned_at = time.monotonic()
        return result

    def _observe(self, scan: GuestRamScan | None) -> None:
        if scan is None:
            return
        obs = self.ledger.observe(scan, self.vm.balloon.actual_bytes)
        RESIDENCY_SCAN_SECONDS.observe(scan.seconds)
        self.cadence.next_interval(self._cpu_seconds, obs.changed)
        self._next_scan = time.monotonic() + self.cadence.wanted

    def _earliest_scan(self) -> float:
        """The budget's bound: no scan before this, whatever asks for one (moved stats, a
        report due). With many VMs it wins, and a report is seen a little later, not at its
        time. Worked out from the share of now, not of the last scan's time: the share grows
        as other VMs are found idle, and a VM scanned while all moved must not wait for ever."""
        self.cadence.budget = self.budget()
        cost = self.cadence.cost
        return self._scanned_at + (cost / self.cadence.budget if cost else 0.0)

    def _publish(self) -> None:
        vm, now = self.vm, time.time()
        latest = self.ledger.summary() if self.ledger.scans else None
        stats = vm.guest_stats if vm.guest_stats is not None and vm.guest_stats.valid else None
        # Guest stats are up to a poll old: combine them with the scan of their moment.
        aligned = latest
        if latest is not None and stats is not None and stats.last_update is not None:
            aligned = self.ledger.summary_near(stats.last_update + 0.5)  # whole-second stamps
        self._reconcile(stats, aligned)
        result = estimate(
            now=now,
            ram_bytes=vm.memory.ram_bytes,
            balloon_actual=vm.balloon.actual_bytes if vm.balloon.present else None,
            balloon_problem=vm.balloon.problem,
            reporting_enabled=vm.balloon.free_page_reporting,
            stats=vm.guest_stats,
            stats_problem=vm.guest_stats_error,
            ledger=aligned,
            host_problem=one_line(str(self.problem), MAX_ERROR) if self.problem else None,
            free=self.free,
            agent_at=self.free_lists.at
            if self.free is not None and self.free.source == "agent" and self.free_lists
            else None,
        )
        vm.estimate = result
        vm.advice = advise(
            at=now,
            estimate=result,
            stats=stats,
            actual_bytes=vm.balloon.actual_bytes if vm.balloon.present else None,
            deflate_on_oom=vm.balloon.deflate_on_oom is True,
            pressure=self.pressure.observe(stats, result.margin_bytes),
            minimum_bytes=self.minimum(),
        )
        vm.host = HostStatus(
            available=latest is not None and self.problem is None,
            problem=self.problem.reason.value if self.problem else None,
            # Details quote paths and names QEMU gave: bounded, valid text.
            problem_detail=one_line(self.problem.detail, MAX_ERROR) if self.problem else None,
            reporting_effective=result.reporting_effective,
            scan_interval_seconds=self.cadence.cost and self.cadence.cost / self.cadence.budget,
            ledger=latest,
        )

    def _reconcile(self, stats: GuestStats | None, aligned: LedgerSummary | None) -> None:
        """Move the free split to the stats' moment, once per new moment."""
        if stats is None or stats.free_bytes is None or stats.last_update is None:
            return
        if aligned is None or aligned.at is None:
            return
        key = (stats.last_update, aligned.at)
        if key == self._moment_key:
            return
        self._moment_key = key
        free = stats.free_bytes // PAGE_SIZE
        touched = aligned.refaulted_bytes_total + aligned.first_touch_bytes_total
        allocated, self._touched = max(0, touched - self._touched) // PAGE_SIZE, touched
        moment = Moment(
            at=stats.last_update,
            free_pages=free,
            host_at=aligned.at,
            absent_free_pages=min(
                free, (aligned.reported_bytes + aligned.unattributed_bytes) // PAGE_SIZE
            ),
            discarded_pages=aligned.discarded_bytes_total // PAGE_SIZE,
            allocated_pages=allocated,
            reporting=self.vm.balloon.free_page_reporting is True,
        )
        self.free = self.reconciler.observe(moment, self._agent_split(stats.last_update))

    def _agent_split(self, stats_at: float) -> AgentSplit | None:
        """The agent's last read, if it is of about the stats' moment (within a poll)."""
        lists = self.free_lists
        if lists is None or abs(lists.at - (stats_at + 0.5)) > AGENT_ALIGNED:
            return None
        return AgentSplit(lists.at, lists.by_order_pages, lists.reporting_order)

    def _ensure_view(self) -> HostView:
        """The VM's host view, made again when the QEMU process or the RAM layout changed."""
        vm, mem = self.vm, self.vm.memory
        key = (
            vm.pid,
            mem.ramblock_text,
            mem.base_bytes,
            tuple(str(d) for d in mem.memdevs),
            tuple(sorted(mem.mem_paths.items())),
        )
        if key != self._key or self.view is None:
            pid_changed = self._key is None or self._key[0] != vm.pid
            self._drop_view()
            self.view = HostView.from_qmp(
                vm.pid, mem.ramblock_text, mem.memdevs, mem.base_bytes, mem_paths=mem.mem_paths
            )
            if pid_changed:  # another QEMU process: what the old one discarded says nothing now
                self.ledger = Ledger(gpa_map=_gpa_map(mem.mtree_text))
                vm.ranges = self.ledger.history
                self.reconciler, self.free = Reconciler(), None
                self._moment_key, self._touched = None, 0
            self._key = key
            self._next_scan = 0.0
        return self.view


def _timed_scan(view: HostView) -> tuple[GuestRamScan | Unavailable, float]:
    """``view.scan()`` and the CPU time it took on this thread."""
    started = time.thread_time()
    result = view.scan()
    return result, time.thread_time() - started


def _gpa_map(mtree_text: str | None) -> GuestPhysMap | None:
    if not mtree_text:
        return None
    try:
        return GuestPhysMap.from_mtree(mtree_text)
    except ValueError:
        return None
