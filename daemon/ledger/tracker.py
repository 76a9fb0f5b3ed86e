"""Per-VM host tracking: scan residency on an adaptive cadence, feed the ledger, estimate.

A ``HostTracker`` is called from the VM's poll loop with the live QMP connection. It owns the
VM's ``HostView`` (re-made when the QEMU process or RAM layout changes), its ``Ledger`` and its
scan cadence, and publishes frozen objects for the API and metrics: ``VMState.host`` (a
``HostStatus``: residency and ledger counters) and ``VMState.estimate``.

Scans run in a worker thread so a large VM never stalls the event loop; the ledger is updated
back on the loop, where the API reads it. The daemon gives all trackers one scanner thread:
a scan is mostly Python holding the GIL, so more threads would not scan faster, only take the
GIL from the event loop more often. The CPU budget is charged with everything a scan costs on
that thread (reading maps, checks, the scan itself), not only the syscalls.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any

from daemon.fleet import VMState
from daemon.host.cadence import ScanCadence
from daemon.host.mtree import GuestPhysMap
from daemon.host.unavailable import Unavailable
from daemon.host.view import GuestRamScan, HostView
from daemon.instruments import RESIDENCY_SCAN_SECONDS
from daemon.ledger.estimate import SETTLE_SECONDS as SETTLE
from daemon.ledger.estimate import Estimate, Inputs, estimate, settled
from daemon.ledger.ranges import Ledger
from daemon.ledger.status import HostStatus
from daemon.qmp import probe
from daemon.qmp.connection import QMPConnection

UNAVAILABLE_RETRY = 10.0  # seconds before retrying a host view that failed


class HostTracker:
    """Host view, ledger and estimate of one VM."""

    def __init__(
        self, *, budget: float, interval: float = 1.0, scanner: Executor | None = None
    ) -> None:
        self.budget = budget
        self.scanner = scanner  # None: asyncio's default executor
        self.interval = interval
        self.view: HostView | None = None
        self.ledger = Ledger()
        self.cadence = ScanCadence(budget=budget, interval=interval, idle_interval=4 * interval)
        self.problem: Unavailable | None = None
        self.steady_stranded: int | None = None
        self.last: Estimate | None = None
        self._key: tuple[Any, ...] | None = None
        self._next_scan = 0.0

    def close(self) -> None:
        """Drop the view; its descriptors are closed on the scanner, after any scan in flight.

        A scan may still run on the view (its VM was removed, or the update awaiting it was
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

    def _ensure_view(self, vm: VMState) -> HostView:
        mem = vm.memory
        key = (
            vm.pid,
            mem.ramblock_text,
            mem.base_bytes,
            tuple(str(d) for d in mem.memdevs),
            tuple(sorted(mem.mem_paths.items())),
        )
        if key != self._key or self.view is None:
            pid_changed = self._key is None or self._key[0] != vm.pid
            self.close()
            self.view = HostView.from_qmp(
                vm.pid, mem.ramblock_text, mem.memdevs, mem.base_bytes, mem_paths=mem.mem_paths
            )
            if pid_changed:  # another QEMU process: what the old one discarded says nothing now
                self.ledger = Ledger(gpa_map=_gpa_map(mem.mtree_text))
                self.steady_stranded = None
            self._key = key
            self._next_scan = 0.0
        return self.view

    async def update(self, vm: VMState, conn: QMPConnection | None) -> None:
        """Scan if due, then publish ``vm.host`` and ``vm.estimate``.

        Never raises for trouble with the host view: that is published as ``vm.host.problem``.
        """
        view = self._ensure_view(vm)
        stats = vm.guest_stats
        if stats is not None and stats.valid and stats.free_bytes is not None:
            self.ledger.note_guest_free(stats.free_bytes, stats.last_update or time.time())
        if time.monotonic() >= self._next_scan:
            loop = asyncio.get_running_loop()
            result, cpu_seconds = await loop.run_in_executor(self.scanner, _timed_scan, view)
            if isinstance(result, Unavailable):
                self.problem = result
                self._next_scan = time.monotonic() + UNAVAILABLE_RETRY
            else:
                self.problem = None
                if conn is not None and conn.connected:
                    # The ledger wants the balloon read after the scan (see daemon.ledger.ranges).
                    await probe.read_balloon_actual(conn, vm)
                obs = self.ledger.observe(result, vm.balloon.actual_bytes)
                RESIDENCY_SCAN_SECONDS.observe(result.seconds)
                wait = self.cadence.next_interval(cpu_seconds, obs.changed)
                self._next_scan = time.monotonic() + wait
        self._publish(vm)

    def _publish(self, vm: VMState) -> None:
        now = time.time()
        summary = self.ledger.summary() if self.ledger.scans else None
        facts = self.ledger.reporting_facts(now) if summary else None
        recent = self.ledger.reporting_facts(now, window=SETTLE) if summary else None
        stats = vm.guest_stats
        inputs = Inputs(
            now=now,
            ram_bytes=vm.memory.ram_bytes,
            balloon_actual=vm.balloon.actual_bytes if vm.balloon.present else None,
            balloon_problem=vm.balloon.problem,
            reporting_enabled=vm.balloon.free_page_reporting,
            stats=stats,
            stats_problem=vm.guest_stats_error,
            ledger=summary,
            host_problem=str(self.problem) if self.problem else None,
            facts=facts,
            recent=recent,
            steady_stranded=self.steady_stranded,
        )
        result = estimate(inputs)
        if settled(inputs) and result.components["stranded"].bytes is not None:
            self.steady_stranded = result.components["stranded"].bytes
        self.last = result
        vm.estimate = result
        vm.host = HostStatus(
            available=summary is not None and self.problem is None,
            problem=self.problem.reason.value if self.problem else None,
            problem_detail=self.problem.detail if self.problem else None,
            reporting_effective=result.reporting_effective,
            scan_interval_seconds=self.cadence.cost and self.cadence.cost / self.budget,
            ledger=summary,
        )


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
