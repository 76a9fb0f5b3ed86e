"""The poll cycle: scans run on the scanner it is given, the budget is charged in full, and a
cycle over a real QMP connection reads, scans, observes and publishes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from daemon import vmcycle
from daemon.config import Address, Settings, VMConfig
from daemon.fleet import Fleet, VMState
from daemon.host.ramblocks import GuestRamBlock, RamBlock
from daemon.host.unavailable import Unavailable
from daemon.host.view import GuestRamScan, HostView
from daemon.ledger.reconcile import FreeState
from daemon.qmp import probe
from daemon.qmp.connection import QMPConnection
from daemon.qmp.errors import QMPSessionError
from daemon.qmp.monitor import QMPMonitor
from daemon.service import Reclaimd
from daemon.vmcycle import VMCycle
from tests.host.memchild import MemChild
from tests.qmp.fake_qmp import FakeQMPServer, FakeVM
from tests.qmp.test_session import eventually

MiB = 1 << 20
BURN = 0.03  # CPU-seconds of Python work a scan does besides the scanner syscalls
UNBOUNDED = 1e6  # a scan budget that never holds a scan back: for tests about something else


class Idle:
    """A monitor with nothing to read: these tests are about the host side of the cycle."""

    connected = False

    async def poll(self) -> None:
        pass

    async def read_balloon(self) -> None:
        pass


async def test_scan_cost_is_charged_in_full_on_the_scanner_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks = [GuestRamBlock(RamBlock("pc.ram", 4096, 0, 16 * MiB, 16 * MiB), "memdev-id")]
    threads: list[str] = []
    with MemChild() as child, ThreadPoolExecutor(1, thread_name_prefix="scan") as scanner:
        child.map("ram", "anon", 16 * MiB)
        child.touch("ram", [(0, 100)])
        view = HostView(child.pid, blocks)
        real_scan = view.scan

        def scan_with_overhead() -> GuestRamScan | Unavailable:
            # Stands for what a scan costs outside the scanner itself (maps, checks).
            threads.append(threading.current_thread().name)
            started = time.thread_time()
            while time.thread_time() - started < BURN:
                pass
            return real_scan()

        monkeypatch.setattr(view, "scan", scan_with_overhead)
        vm = Fleet().add("vm1", "unix:/nonexistent", "connect")
        cycle = VMCycle(vm, budget=lambda: 0.05, scanner=scanner)
        monkeypatch.setattr(cycle, "_ensure_view", lambda: view)
        await cycle(Idle())
        view.close()
    assert threads and threads[0].startswith("scan")
    assert cycle.cadence.cost is not None and cycle.cadence.cost >= BURN
    assert vm.host is not None and vm.host.ledger is not None
    assert vm.host.ledger.backed_bytes == 100 * 4096
    assert vm.host.scan_interval_seconds is not None
    assert vm.host.scan_interval_seconds >= BURN / 0.05  # the budget sets the pace


async def test_a_view_dropped_during_a_scan_is_closed_after_it() -> None:
    blocks = [GuestRamBlock(RamBlock("pc.ram", 4096, 0, 16 * MiB, 16 * MiB), "memdev-id")]
    events: list[str] = []
    scanning, release = threading.Event(), threading.Event()
    with MemChild() as child, ThreadPoolExecutor(1) as scanner:
        child.map("ram", "memfd", 16 * MiB)
        view = HostView(child.pid, blocks)
        real_scan, real_close = view.scan, view.close

        def slow_scan() -> GuestRamScan | Unavailable:
            scanning.set()
            release.wait(5)
            result = real_scan()  # opens the backing file's descriptor
            events.append("scanned")
            return result

        def close() -> None:
            real_close()
            events.append("closed")

        view.scan, view.close = slow_scan, close  # type: ignore[method-assign]
        cycle = VMCycle(Fleet().add("vm1", "unix:/x", "connect"), budget=lambda: 0.05)
        cycle.scanner = scanner
        cycle.view = view
        in_flight = scanner.submit(view.scan)
        assert scanning.wait(5)
        cycle.close()  # the VM is removed while its scan runs
        assert cycle.view is None and events == []
        release.set()
        in_flight.result(5)
        scanner.submit(lambda: None).result(5)  # the scanner has run what was queued
        assert events == ["scanned", "closed"]
        assert view._file_fds == {} and view._pagemap_fd is None  # nothing left open


async def test_a_view_that_did_not_move_is_confirmed_without_a_scan() -> None:
    blocks = [GuestRamBlock(RamBlock("pc.ram", 4096, 0, 16 * MiB, 16 * MiB), "memdev-id")]
    with MemChild() as child, ThreadPoolExecutor(1) as scanner:
        child.map("ram", "memfd", 16 * MiB)
        child.touch("ram", [(0, 1024)])
        vm = Fleet().add("vm1", "unix:/x", "connect")
        vm.pid = child.pid
        cycle = VMCycle(vm, budget=lambda: UNBOUNDED, scanner=scanner)
        cycle.view = HostView(child.pid, blocks)
        cycle._ensure_view = lambda: cycle.view  # type: ignore[assignment,method-assign,return-value]
        await cycle(Idle())
        assert cycle.ledger.scans == 1 and cycle.moving
        scanned_at = cycle.ledger.at
        assert scanned_at is not None
        for _ in range(3):
            cycle._next_scan = 0.0  # a scan would be due: the look makes it unneeded
            await asyncio.sleep(0.01)
            await cycle(Idle())
        assert cycle.ledger.scans == 1 and not cycle.moving
        assert vm.host is not None and vm.host.ledger is not None
        confirmed_at = vm.host.ledger.at
        assert confirmed_at is not None and confirmed_at > scanned_at  # as fresh as the look
        assert vm.host.ledger.backed_bytes == 1024 * 4096
        child.punch("ram", [(512, 1024)])  # reporting returned a 2 MiB block
        cycle._next_scan = 0.0
        await cycle(Idle())
        assert cycle.ledger.scans == 2 and cycle.moving
        assert vm.host.ledger.backed_bytes == 512 * 4096
        # However still it looks, a scan at least every FULL_SCAN_EVERY seconds.
        cycle._scanned_at -= vmcycle.FULL_SCAN_EVERY
        cycle._next_scan = 0.0
        await cycle(Idle())
        assert cycle.ledger.scans == 3 and not cycle.moving
        cycle.close()


# -- the whole cycle over a real QMP connection, at the socket seam ---------------------------

RAM = 64 * MiB
PAGES = RAM // 4096


@pytest.fixture
def qemu_like() -> Iterator[MemChild]:
    """A process holding 64 MiB of touched anonymous "guest RAM", as QEMU's pc.ram."""
    with MemChild() as child:
        child.map("ram", "anon", RAM)
        child.touch("ram", [(0, PAGES)])
        yield child


def fake_vm() -> FakeVM:
    return FakeVM(name="vm1", ram=RAM, actual=RAM, free=40 * MiB, total=60 * MiB,
                  available=44 * MiB, caches=2 * MiB)  # fmt: skip


async def attached(server: FakeQMPServer, vm: VMState, settings: Settings) -> QMPMonitor:
    conn = QMPConnection("vm1", command_timeout=settings.command_timeout)
    await conn.connect(Address.parse(server.address), settings.connect_timeout)
    await probe.attach(conn, vm, stats_interval=2)
    return QMPMonitor(conn, vm)


async def test_a_cycle_polls_scans_reads_the_balloon_after_the_scan_and_publishes(
    settings: Settings, sockdir: Path, qemu_like: MemChild
) -> None:
    server = await FakeQMPServer(sockdir / "vm1.qmp", fake_vm(), tcp=True).start()
    vm = Fleet().add("vm1", server.address, "connect")
    vm.pid = qemu_like.pid  # TCP: the socket cannot tell QEMU's pid
    cycle = VMCycle(vm, budget=lambda: UNBOUNDED)
    monitor = await attached(server, vm, settings)
    try:
        await cycle(monitor)
        assert vm.host is not None and vm.host.ledger is not None, vm.host
        assert vm.host.ledger.backed_bytes == RAM
        assert vm.estimate is not None and vm.estimate.components["reported"].bytes == 0

        # Free page reporting returns an aligned 2 MiB block; the guest's next stats push says
        # its free memory rose. (The estimate combines the stats with the scan nearest to
        # them, and QEMU stamps them in whole seconds: a second apart, the moments are clear.)
        await asyncio.sleep(1.2)
        qemu_like.dontneed("ram", [(2048, 2560)])
        server.vm.free += 2 * MiB
        server.vm.stats_time = int(time.time())
        cycle._next_scan = 0.0  # due now, whatever the cadence says
        await cycle(monitor)
        assert [(r.block, r.offset, r.order) for r in vm.ranges.query()] == [
            ("pc.ram", 8 * MiB, 9)
        ]  # fmt: skip
        assert vm.ranges.total == 1
        assert vm.estimate.components["reported"].bytes == 2 * MiB

        # The balloon inflates by 100 scattered pages after the poll read the balloon and
        # before the scan: only the balloon read after the scan explains the absent pages.
        balloon = [(p, p + 1) for p in range(9000, 9700, 7)]

        def inflate_after_the_stats_read(command: str, args: dict[str, Any]) -> None:
            if command == "qom-get" and args.get("property") == "guest-stats":
                qemu_like.dontneed("ram", balloon)
                server.vm.actual -= len(balloon) * 4096
                server.on_command = None

        server.on_command = inflate_after_the_stats_read
        cycle._next_scan = 0.0
        before = len(server.commands)
        await cycle(monitor)
        assert server.commands[before:] == ["query-balloon", "qom-get", "query-balloon"]
        ledger = vm.host.ledger
        assert ledger.ballooned_bytes == len(balloon) * 4096
        assert ledger.unexplained_bytes == 0
        assert vm.estimate.components["ballooned"].bytes == len(balloon) * 4096

        # No scan due: the cycle polls the monitor and publishes, and reads the balloon once.
        cycle._next_scan = float("inf")
        before = len(server.commands)
        await cycle(monitor)
        assert server.commands[before:] == ["query-balloon", "qom-get"]
    finally:
        await monitor.conn.close()
        cycle.close()
        await server.stop()


async def test_trouble_with_the_monitor_reaches_the_session_and_a_host_view_bug_does_not(
    settings: Settings, sockdir: Path, qemu_like: MemChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await FakeQMPServer(sockdir / "vm1.qmp", fake_vm(), tcp=True).start()
    vm = Fleet().add("vm1", server.address, "connect")
    vm.pid = qemu_like.pid
    cycle = VMCycle(vm, budget=lambda: UNBOUNDED)
    monitor = await attached(server, vm, settings)
    try:

        def broken_observe(*args: Any) -> None:
            raise ZeroDivisionError("a bug in the ledger")

        await cycle(monitor)  # the first cycle makes the view and its ledger
        monkeypatch.setattr(cycle.ledger, "observe", broken_observe)
        assert cycle.view is not None
        monkeypatch.setattr(cycle.view, "unchanged", lambda: False)  # a scan is due
        cycle._next_scan = 0.0
        await cycle(monitor)  # does not raise: the session lives on
        assert vm.host is not None and vm.host.problem == "internal_error"
        assert "ZeroDivisionError" in (vm.host.problem_detail or "")

        server.behaviour.hangup_on = "query-balloon"
        with pytest.raises(QMPSessionError):
            await cycle(monitor)
    finally:
        await monitor.conn.close()
        cycle.close()
        await server.stop()


async def test_the_daemon_uses_the_configured_pid_of_a_vm_attached_over_tcp(
    settings: Settings, sockdir: Path, qemu_like: MemChild
) -> None:
    server = await FakeQMPServer(sockdir / "vm1.qmp", fake_vm(), tcp=True).start()
    config = VMConfig(name="vm1", address=server.address, pid=qemu_like.pid)
    daemon = Reclaimd(settings.model_copy(update={"vm": [config]}))
    await daemon.start()
    try:
        vm = daemon.fleet.get("vm1")
        assert vm is not None

        def scanned() -> bool:
            return vm.host is not None and vm.host.ledger is not None

        await eventually(scanned)
        assert vm.pid == qemu_like.pid
        assert vm.host is not None and vm.host.ledger is not None
        assert vm.host.ledger.backed_bytes == RAM
    finally:
        await daemon.stop()
        await server.stop()


def test_the_agent_is_read_each_stats_push_while_the_split_drifts() -> None:
    """A busy allocator moves the guest's free lists under a steady free total: when the last
    read found the model off by a percent of RAM, the next read is due after a push, not after
    ``agent_refresh``."""

    vm = Fleet().add("vm1", "unix:/x", "connect")
    vm.memory.base_bytes = 1024 * MiB
    cycle = VMCycle(vm, budget=lambda: 1.0, agent_refresh=60.0)
    cycle._agent_asked = (time.monotonic() - 2.5, 0)

    def state(residual_mib: int) -> FreeState:
        return FreeState(
            at=0.0, source="agent", by_order_pages=(0,) * 11, reporting_order=9,
            residual_pages=residual_mib * MiB // 4096, residual_at=0.0, agent_skew_seconds=0.0,
            pending_pages=0, pending_since=None, report_due_at=None, verdict="effective",
            evidence=None,
        )  # fmt: skip

    cycle.free = state(2)  # off by 0.2 % of RAM: the schedule stands
    assert not cycle._agent_due(1024 * MiB)
    cycle.free = state(20)  # off by 2 %: read again
    assert cycle._agent_due(1024 * MiB)
    cycle._agent_asked = (time.monotonic() - 0.5, 0)  # but not more often than a push
    assert not cycle._agent_due(1024 * MiB)


def test_reads_that_moving_memory_asks_for_are_spaced_as_the_daemon_says() -> None:
    vm = Fleet().add("vm1", "unix:/x", "connect")
    vm.memory.base_bytes = 1024 * MiB
    spacing = [25.0]  # a large fleet: the daemon-wide rate of such reads is shared
    cycle = VMCycle(vm, budget=lambda: 1.0, agent_refresh=60.0, agent_spacing=lambda: spacing[0])
    cycle.free = FreeState(
        at=0.0, source="agent", by_order_pages=(0,) * 11, reporting_order=9,
        residual_pages=20 * MiB // 4096, residual_at=0.0, agent_skew_seconds=0.0,
        pending_pages=0, pending_since=None, report_due_at=None, verdict="effective",
        evidence=None,
    )  # fmt: skip
    cycle._agent_asked = (time.monotonic() - 10.0, 0)
    assert not cycle._agent_due(1024 * MiB)  # drifting, but 10 s < 25 s
    spacing[0] = 2.0
    assert cycle._agent_due(1024 * MiB)
    cycle._agent_asked = (time.monotonic() - 61.0, 0)  # the refresh is due whatever the spacing
    spacing[0] = 100.0
    assert cycle._agent_due(1024 * MiB)


def test_the_scan_budget_is_shared_by_the_vms_that_move(settings: Settings) -> None:
    daemon = Reclaimd(settings.model_copy(update={"scan_budget": 0.06}))
    fleet = Fleet()
    cycles = [VMCycle(fleet.add(f"vm{i}", "unix:/x", "connect"), budget=lambda: 1.0)
              for i in range(6)]  # fmt: skip
    daemon._cycles = {c.vm.name: c for c in cycles}
    assert daemon._scan_budget_share() == pytest.approx(0.01)  # all move until looked at
    for c in cycles[2:]:
        c.moving = False
    assert daemon._scan_budget_share() == pytest.approx(0.01)  # counted once a second
    daemon._moving_counted_at -= 1.0
    assert daemon._scan_budget_share() == pytest.approx(0.03)
    for c in cycles:
        c.moving = False
    daemon._moving_counted_at -= 1.0
    assert daemon._scan_budget_share() == pytest.approx(0.06)


def test_the_budget_bound_follows_the_share_of_now() -> None:
    # Scanned while all 500 VMs moved, a VM must not wait out that share's bound once the
    # others were found idle.
    share = [0.05 / 500]
    cycle = VMCycle(Fleet().add("vm1", "unix:/x", "connect"), budget=lambda: share[0])
    cycle.cadence.next_interval(0.002, changed=True)  # a scan of 2 ms
    cycle._scanned_at = time.monotonic()
    assert cycle._earliest_scan() - cycle._scanned_at == pytest.approx(20.0)
    share[0] = 0.05 / 50
    assert cycle._earliest_scan() - cycle._scanned_at == pytest.approx(2.0)
