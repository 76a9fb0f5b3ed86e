"""The reconciled estimate on the real test guest with its real guest agent (qemu-ga)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.model.constants import PAGE_SIZE
from daemon.testguest import QemuGuestSpec, RunningGuest, fields
from tests.e2e.conftest import BootGuest
from tests.e2e.reclaimd_proc import ReclaimdProcess

pytestmark = pytest.mark.e2e

MiB = 1 << 20
POLL = 1.0


def attach(
    boot_guest: BootGuest,
    reclaimd: Callable[..., ReclaimdProcess],
    short_dir: Path,
    name: str,
    **spec: Any,
) -> tuple[RunningGuest, ReclaimdProcess]:
    qmp = short_dir / f"{name}.qmp"
    guest = boot_guest(QemuGuestSpec(name=name, qmp_path=qmp, **spec))
    assert guest.agent_path is not None
    # Stats every second: when the guest freed memory is known to within one push, so the
    # prediction of when reporting returns it can be held to a second and a half.
    rd = reclaimd(
        "--vm",
        f"{name}=unix:{qmp},agent=unix:{guest.agent_path}",
        env={"RECLAIMD_STATS_INTERVAL": "1", "RECLAIMD_POLL_INTERVAL": "1"},
    )
    rd.wait_for(
        lambda: (rd.get(f"/api/v1/vms/{name}").get("agent") or {}).get("ok"),
        30,
        "a first read through the guest's agent",
    )
    return guest, rd


def shell_split(guest: RunningGuest) -> list[int]:
    """The guest's /proc/buddyinfo, all zones, in bytes per order, as its shell prints it."""
    total = [0] * 11
    for counts in fields(guest.send("buddyinfo")).values():
        for order, count in enumerate(counts.split(",")):
            total[order] += int(count) << order
    return [pages * PAGE_SIZE for pages in total]


def test_the_split_is_the_guests_own_and_reporting_is_predicted_in_time(
    boot_guest: BootGuest, reclaimd: Callable[..., ReclaimdProcess], short_dir: Path
) -> None:
    guest, rd = attach(boot_guest, reclaimd, short_dir, "ag")

    # The split reclaimd holds equals the guest's own print of its free lists, within a poll
    # (a quiet guest: the agent reads it when free memory moves, or at its refresh).
    def matches() -> bool:
        agent = rd.get("/api/v1/vms/ag")["agent"]
        return agent["free_by_order_bytes"] == shell_split(guest)

    rd.wait_for(matches, 70, "the agent's split to equal the guest's own /proc/buddyinfo")
    estimate = rd.get("/api/v1/vms/ag/estimate")["estimate"]
    assert estimate["components"]["stranded"]["source"] == "agent"
    assert estimate["reporting_order"] == 9

    guest.send("alloc 200")
    rd.wait_for(
        lambda: rd.get("/api/v1/vms/ag")["guest_stats"]["free_bytes"] < 300 * MiB,
        20,
        "the guest's stats to show the allocation",
    )
    time.sleep(3 * POLL)
    reported_before = rd.get("/api/v1/vms/ag")["host"]["reported_bytes"]
    guest.send("free")
    due: float | None = None
    observed: float | None = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and observed is None:
        vm = rd.get("/api/v1/vms/ag")
        due = (vm["estimate"] or {}).get("report_due_at") or due
        if vm["host"]["reported_bytes"] - reported_before >= 180 * MiB:
            observed = vm["host"]["at"]  # the scan that first saw it all discarded
        time.sleep(0.2)
    assert observed is not None, "the host never saw the 200 MiB reported"
    assert due is not None, "no prediction of when it would be reported"
    # The host scans about once a second: what it observes is up to a scan late.
    assert abs(due - observed) <= 1.5, (due, observed)
    estimate = rd.wait_for(
        lambda: (
            (e := rd.get("/api/v1/vms/ag/estimate")["estimate"])["verdict"] == "effective" and e
        ),
        20,
        "the verdict on reporting",
    )
    assert "predicted" in estimate["reporting_note"]


def test_reporting_off_strands_all_free_memory_even_in_large_blocks(
    boot_guest: BootGuest, reclaimd: Callable[..., ReclaimdProcess], short_dir: Path
) -> None:
    guest, rd = attach(boot_guest, reclaimd, short_dir, "ao", free_page_reporting=False)
    guest.send("alloc 200")
    time.sleep(2 * POLL)
    guest.send("free")
    freed_at = time.time()

    def freed_and_read() -> dict[str, Any] | None:
        # The split is the agent's read: one made before the free still shows the 200 MiB in
        # use, whatever the stats say since (the agent is re-read when free memory moves).
        # The stats are scaled to, so they too must be of after the free (whole-second stamps).
        vm = rd.get("/api/v1/vms/ao")
        estimate = vm["estimate"]
        free_resident = estimate["components"]["free_resident"]["bytes"] or 0
        read_after = (vm["agent"]["at"] or 0) > freed_at
        stats_after = ((vm["guest_stats"] or {}).get("last_update") or 0) >= freed_at + 1
        by_order = {row["order"]: row["returned_bytes"] for row in estimate["by_order"]}
        # Yet the guest has it in large blocks: the what-if at its order says what reporting
        # would return.
        big = by_order.get(9, 0) > 150 * MiB
        settled = free_resident > 150 * MiB and read_after and stats_after and big
        return estimate if settled else None

    estimate = rd.wait_for(
        freed_and_read, 30, "inputs of after the free, and the what-if at order 9 to show it"
    )
    c = estimate["components"]
    assert c["reportable"]["bytes"] == 0
    assert c["stranded"]["bytes"] == c["free_resident"]["bytes"]
    assert c["stranded"]["reason"].startswith("free page reporting is off")


def test_page_poisoning_makes_reporting_ineffective(
    boot_guest: BootGuest, reclaimd: Callable[..., ReclaimdProcess], short_dir: Path
) -> None:
    guest, rd = attach(boot_guest, reclaimd, short_dir, "ap", kernel_args=("page_poison=1",))
    guest.send("alloc 200")
    time.sleep(2 * POLL)
    guest.send("free")
    estimate = rd.wait_for(
        lambda: (
            (e := rd.get("/api/v1/vms/ap/estimate")["estimate"])["verdict"] == "ineffective" and e
        ),
        40,
        "reporting to be found ineffective",
    )
    assert "without effect" in estimate["reporting_note"]
    assert estimate["components"]["reportable"]["bytes"] == 0
