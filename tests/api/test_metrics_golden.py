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
from daemon.ledger.estimate import Component, OrderRow
from tests.fleets import estimated, running_vm, scanned

GOLDEN = Path(__file__).parent / "golden" / "metrics.prom"
MiB = 1 << 20
NOW = 1_800_000_000.0


def known_fleet() -> Fleet:
    fleet = Fleet()
    web = running_vm(
        fleet,
        "web1",
        uuid="5f1d9f5c-0000-4000-8000-000000000001",
        qemu_version="7.2.22",
        ram=2048 * MiB,
        actual=1536 * MiB,
    )
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
    web.host = scanned(
        at=NOW - 1,
        scans=10,
        ram=2048 * MiB,
        resident=900 * MiB,
        reported=500 * MiB,
        ballooned=512 * MiB,
        unattributed=136 * MiB,
        reported_total=640 * MiB,
        discarded_total=640 * MiB,
        refaulted_total=140 * MiB,
        refaulted_reported_total=140 * MiB,
        ranges_total=7,
        last_reported_at=NOW - 5,
    )
    observed = {
        "ballooned": 512 * MiB,
        "reported": 500 * MiB,
        "free_resident": 200 * MiB,
        "reportable": 0,
        "stranded": 200 * MiB,
        "cache": 300 * MiB,
    }
    web.estimate = estimated(
        at=NOW,
        ram=2048 * MiB,
        margin=102 * MiB,
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
