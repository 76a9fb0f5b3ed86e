"""The reclaim controller with ``act`` on the real test guest: it takes back stranded memory and
cache, never what free page reporting returned, and deflates before the guest runs short when
its workload allocates again; the journal shows every step."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.testguest import QemuGuestSpec, fields
from tests.e2e.conftest import BootGuest
from tests.e2e.reclaimd_proc import ReclaimdProcess

pytestmark = pytest.mark.e2e

MiB = 1 << 20
RAM = 512 * MiB
STEP = 32 * MiB


def steps(rd: ReclaimdProcess, name: str) -> list[dict[str, Any]]:
    events = rd.get(f"/api/v1/vms/{name}/events", limit=1000)["events"]
    return [
        e["data"]
        for e in reversed(events)  # oldest first
        if e["kind"] == "request" and e["data"].get("requester") == "reclaim-controller"
    ]


def test_act_takes_back_only_what_a_balloon_can_and_deflates_before_the_guest_runs_short(
    boot_guest: BootGuest, reclaimd: Callable[..., ReclaimdProcess], short_dir: Path
) -> None:
    qmp = short_dir / "rc.qmp"
    guest = boot_guest(QemuGuestSpec(name="rc", qmp_path=qmp, ram_bytes=RAM))
    assert guest.agent_path is not None
    rd = reclaimd(
        "--vm",
        f"rc=unix:{qmp},agent=unix:{guest.agent_path}",
        "--reclaim",
        "act",
        env={
            "RECLAIMD_RECLAIM_HOST_TARGET": "0",  # the host goal is always met: the guest decides
            "RECLAIMD_RECLAIM_COOLDOWN": "2",
            "RECLAIMD_RECLAIM_STEP_BYTES": str(STEP),
        },
    )
    # Memory the guest wrote and freed: free page reporting returns it, the balloon must not.
    guest.send("alloc 200")
    time.sleep(2)
    guest.send("free")
    rd.wait_for(
        lambda: (rd.get("/api/v1/vms/rc")["host"] or {}).get("reported_bytes", 0) > 150 * MiB,
        60,
        "free page reporting to return what the guest freed",
    )
    inflations = rd.wait_for(
        lambda: [s for s in steps(rd, "rc") if s["action"] == "inflate"],
        120,
        "a first inflation step",
    )
    for s in inflations:
        assert s["reason"] == "advice"
        assert 0 < s["actual_bytes"] - s["target_bytes"] <= STEP
    # A few more cycles (steps every 2 s at most), then hold it to what it took.
    time.sleep(10)
    inflations = [s for s in steps(rd, "rc") if s["action"] == "inflate"]
    vm = rd.get("/api/v1/vms/rc")
    estimate = rd.get("/api/v1/vms/rc/estimate")["estimate"]
    c = estimate["components"]
    taken = RAM - vm["balloon"]["actual_bytes"]
    assert taken > 0
    # What reporting returned is still reported, not swallowed by the balloon (beyond a margin).
    assert c["reported"]["bytes"] > 150 * MiB - estimate["margin_bytes"], c
    expected = sum(s["expected_gain_bytes"] for s in inflations)
    assert expected > 0

    # The workload allocates again, towards what the balloon left it: the controller deflates
    # first, so every allocation succeeds.
    status = fields(guest.send("status"))
    free_mib = int(status["memavailable_kib"]) // 1024
    reply = guest.send(f"alloc {max(16, free_mib - 80)}")
    assert reply.startswith("OK alloc"), reply
    deflations = rd.wait_for(
        lambda: [s for s in steps(rd, "rc") if s["action"] == "deflate"],
        60,
        "a deflation when the guest's available memory neared the margin",
    )
    assert deflations[0]["reason"] in ("near_margin", "pressure")
    assert deflations[0]["target_bytes"] > deflations[0]["actual_bytes"]
    # The guest's driver gives the pages back, and the guest can allocate again.
    rd.wait_for(
        lambda: (
            rd.get("/api/v1/vms/rc")["balloon"]["actual_bytes"]
            >= deflations[-1]["target_bytes"] - 4 * MiB
        ),
        30,
        "the balloon to deflate",
    )
    reply = guest.send("alloc 32")
    assert reply.startswith("OK alloc"), reply
    assert (
        rd.metric(
            "reclaimd_reclaim_actions_total", action="deflate", reason=deflations[0]["reason"]
        )
        or 0
    ) >= 1
