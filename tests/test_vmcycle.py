"""The poll cycle: scans run on the scanner it is given, the budget is charged in full, and a
cycle over a real QMP connection reads, scans, observes and publishes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from daemon.fleet import Fleet
from daemon.host.ramblocks import GuestRamBlock, RamBlock
from daemon.host.unavailable import Unavailable
from daemon.host.view import GuestRamScan, HostView
from daemon.vmcycle import VMCycle
from tests.host.memchild import MemChild

MiB = 1 << 20
BURN = 0.03  # CPU-seconds of Python work a scan does besides the scanner syscalls


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
