"""The whole ``qemu_*`` exposition for a known fleet, compared against a golden file.

Regenerate after an intended change with ``RECLAIMD_UPDATE_GOLDEN=1 pytest tests/api`` and review
the diff like code: every line is a series operators' dashboards and alerts depend on.
"""

from __future__ import annotations

import os
from pathlib import Path

from api.metrics import fleet_exposition
from daemon.fleet import Fleet, SessionState
from daemon.guest_stats import GuestStats
from daemon.ledger.advice import Advice, Pressure
from daemon.ledger.estimate import Component, Estimate, OrderRow
from daemon.ledger.ranges import LedgerSummary
from daemon.ledger.status import HostStatus

GOLDEN = Path(__file__).parent / "golden" / "metrics.prom"
MiB = 1 << 20
NOW = 1_800_000_000.0


def known_fleet() -> Fleet:
    fleet = Fleet()
    web = fleet.add("web1", "unix:/run/qemu/web1.qmp", "connect")
    web.set_session_state(SessionState.RUNNING)
    web.uuid, web.qemu_version, web.running = "5f1d9f5c-0000-4000-8000-000000000001", "7.2.22", True
    web.memory.base_bytes, web.memory.plugged_bytes = 2048 * MiB, 0
    web.balloon.present, web.balloon.actual_bytes, web.balloon.target_bytes = (
        True,
        1536 * MiB,
        1536 * MiB,
    )
    web.balloon.free_page_reporting, web.balloon.deflate_on_oom = True, False
    web.guest_stats = GuestStats(
        last_update=NOW - 3,
        free_bytes=700 * MiB,
        total_bytes=1500 * MiB,
        available_bytes=1000 * MiB,
        disk_caches_bytes=250 * MiB,
        swap_in_bytes=0,
        swap_out_bytes=4096,
        major_faults=12,
        minor_faults=34567,
    )
    web.event_counts = {"BALLOON_CHANGE": 3, "RESUME": 1}
    web.host = HostStatus(
        available=True,
        problem=None,
        problem_detail=None,
        reporting_effective=True,
        scan_interval_seconds=1.0,
        ledger=LedgerSummary(
            at=NOW - 1,
            scans=10,
            covered_bytes=2048 * MiB,
            backed_bytes=900 * MiB,
            resident_bytes=900 * MiB,
            reported_bytes=500 * MiB,
            ballooned_bytes=512 * MiB,
            unexplained_bytes=0,
            unattributed_bytes=136 * MiB,
            reported_bytes_total=640 * MiB,
            discarded_bytes_total=640 * MiB,
            ballooned_bytes_total=512 * MiB,
            unexplained_bytes_total=0,
            refaulted_bytes_total=140 * MiB,
            refaulted_reported_bytes_total=140 * MiB,
            first_touch_bytes_total=0,
            ranges_total=7,
            last_reported_at=NOW - 5,
        ),
    )
    observed = {
        "ballooned": 512 * MiB,
        "reported": 500 * MiB,
        "free_resident": 200 * MiB,
        "reportable": 0,
        "stranded": 200 * MiB,
        "cache": 300 * MiB,
    }
    web.estimate = Estimate(
        at=NOW,
        ram_bytes=2048 * MiB,
        margin_bytes=102 * MiB,
        reporting_enabled=True,
        reporting_effective=True,
        reporting_note=None,
        components={
            **{name: Component(value, "observed", 1.0) for name, value in observed.items()},
            "reclaimable": Component(None, "modelled", None, "guest stats are stale"),
        },
        # 700 MiB free: 64 blocks of each order, and what is left over at order 0.
        by_order=tuple(
            OrderRow(o, ((64 << o) + (700 * 256 - 64 * 2047 if o == 0 else 0)) * 4096, 0)
            for o in range(11)
        ),
    )
    web.advice = Advice(
        at=NOW,
        target_bytes=1848 * MiB,
        expected_gain_bytes=200 * MiB,
        current_bytes=2048 * MiB,
        floor_bytes=1200 * MiB,
        action="inflate",
        reasons=("stranded 200 MiB: only a balloon returns it",),
        pressure=Pressure(),
    )
    down = fleet.add("db1", "unix:/run/qemu/db1.qmp", "poll")
    down.set_session_state(SessionState.DISCONNECTED, "connection closed by peer")
    down.guest_stats = GuestStats(last_update=NOW - 10, valid=False, problems=("free > total",))
    return fleet


def exposition() -> str:
    return fleet_exposition(known_fleet(), now=NOW)


def test_exposition_matches_golden_file() -> None:
    text = exposition()
    if os.environ.get("RECLAIMD_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_names_follow_conventions() -> None:
    for line in exposition().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name.startswith(("qemu_", "reclaimd_")), name
            assert name.endswith("_total") == (kind == "counter"), line
