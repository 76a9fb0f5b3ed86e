"""VMs with every series set, for the exposition tests and the scrape benchmark.

The golden file's fleet (``tests/api/test_metrics_golden.py``) and the benchmark's fleet of
hundreds differ in their numbers, not in how a VM that produces every series is put together:
that is written here once. The benchmark puts the repository root on ``sys.path`` to import it.
"""

from __future__ import annotations

from collections.abc import Mapping

from daemon.fleet import Fleet, SessionState, VMState
from daemon.ledger.estimate import Component, Estimate, OrderRow
from daemon.ledger.ranges import LedgerSummary
from daemon.ledger.status import HostStatus


def running_vm(
    fleet: Fleet, name: str, *, uuid: str, qemu_version: str, ram: int, actual: int
) -> VMState:
    """A VM attached over its QMP socket, running, with a balloon at ``actual`` bytes that
    offers free page reporting (and no deflate-on-oom)."""
    vm = fleet.add(name, f"unix:/run/qemu/{name}.qmp", "connect")
    vm.set_session_state(SessionState.RUNNING)
    vm.uuid, vm.qemu_version, vm.running = uuid, qemu_version, True
    vm.memory.base_bytes, vm.memory.plugged_bytes = ram, 0
    vm.balloon.present, vm.balloon.actual_bytes, vm.balloon.target_bytes = True, actual, actual
    vm.balloon.free_page_reporting, vm.balloon.deflate_on_oom = True, False
    return vm


def scanned(
    *,
    at: float,
    scans: int,
    ram: int,
    resident: int,
    reported: int,
    ballooned: int,
    reported_total: int,
    discarded_total: int,
    refaulted_total: int,
    ranges_total: int,
    last_reported_at: float,
    unattributed: int = 0,
    refaulted_reported_total: int = 0,
) -> HostStatus:
    """The host view of a VM whose scans cover all of ``ram`` (none of it swapped, nothing
    unexplained or touched for the first time) and whose free page reporting is effective."""
    return HostStatus(
        available=True,
        problem=None,
        problem_detail=None,
        reporting_effective=True,
        scan_interval_seconds=1.0,
        ledger=LedgerSummary(
            at=at,
            scans=scans,
            covered_bytes=ram,
            backed_bytes=resident,
            resident_bytes=resident,
            reported_bytes=reported,
            ballooned_bytes=ballooned,
            unexplained_bytes=0,
            unattributed_bytes=unattributed,
            reported_bytes_total=reported_total,
            discarded_bytes_total=discarded_total,
            ballooned_bytes_total=ballooned,
            unexplained_bytes_total=0,
            refaulted_bytes_total=refaulted_total,
            refaulted_reported_bytes_total=refaulted_reported_total,
            first_touch_bytes_total=0,
            ranges_total=ranges_total,
            last_reported_at=last_reported_at,
        ),
    )


def estimated(
    *,
    at: float,
    ram: int,
    margin: int,
    components: Mapping[str, Component],
    by_order: tuple[OrderRow, ...] = (),
) -> Estimate:
    """An estimate of a VM whose free page reporting is on and effective."""
    return Estimate(
        at=at,
        ram_bytes=ram,
        margin_bytes=margin,
        reporting_enabled=True,
        reporting_effective=True,
        reporting_note=None,
        components=dict(components),
        by_order=by_order,
    )
