"""The live path end to end: reclaimd serve attached to real QEMU guests over QMP.

Each mode (connect, listen, poll) against a booted test guest: attach, guest stats with a fresh
last-update, a balloon change through REST, QEMU killed and restarted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.testguest import QemuGuestSpec, RunningGuest
from tests.e2e.reclaimd_proc import ReclaimdProcess

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BootGuest = Callable[..., RunningGuest]


def wait_attached_with_stats(rd: ReclaimdProcess, name: str, booted_at: float) -> dict:
    def ready() -> dict | None:
        reply = rd.client.get(f"/api/v1/vms/{name}")
        if reply.status_code != 200:
            return None
        vm = reply.json()
        stats = vm.get("guest_stats") or {}
        fresh = stats.get("last_update") and stats["last_update"] >= booted_at - 1
        return vm if vm["up"] and fresh and stats.get("free_bytes") else None

    return rd.wait_for(ready, 30 + 60, f"{name} attached with fresh guest stats")


def balloon_round_trip(rd: ReclaimdProcess, name: str, events_expected: bool = True) -> None:
    target = 300 * MiB
    reply = rd.post(f"/api/v1/vms/{name}/balloon", {"target_bytes": target})
    assert reply.status_code == 202, reply.text
    rd.wait_for(
        lambda: rd.metric("qemu_balloon_actual_bytes", vm=name) == target,
        30,
        "qemu_balloon_actual_bytes to converge to 300 MiB",
    )
    if events_expected:
        # QEMU rate-limits BALLOON_CHANGE to one a second: the last one may come after
        # query-balloon already shows the target.
        def last_change_at_target() -> bool:
            events = rd.get(f"/api/v1/vms/{name}/events", limit=200)["events"]
            changes = [e for e in events if e["name"] == "BALLOON_CHANGE"]
            return bool(changes) and changes[0]["data"]["actual"] == target  # newest first

        rd.wait_for(last_change_at_target, 5, "a BALLOON_CHANGE event with the target")
    events = rd.get(f"/api/v1/vms/{name}/events", limit=200)["events"]
    changes = [e for e in events if e["name"] == "BALLOON_CHANGE"]
    if events_expected:
        assert changes, events
        assert changes[0]["data"]["actual"] == target  # newest first
        assert all(e["qemu_time"] for e in changes)
    else:
        assert not changes, events  # poll mode holds no session, so it sees no events
    assert any(e["kind"] == "request" and e["name"] == "balloon" for e in events)


def test_connect_mode(
    boot_guest: BootGuest, reclaimd: Callable[..., ReclaimdProcess], short_dir: Path
) -> None:
    qmp = short_dir / "g1.qmp"
    spec = QemuGuestSpec(name="g1", qmp_path=qmp)
    booted_at = time.time()
    guest = boot_guest(spec, ready=False)
    rd = reclaimd("--vm", f"g1=unix:{qmp}")
    vm = wait_attached_with_stats(rd, "g1", booted_at)
    assert time.time() - booted_at < 30 + 60  # 30 s on an idle machine; slack for loaded CI
    assert re.fullmatch(r"\d+\.\d+\.\d+", vm["qemu_version"])
    assert vm["memory"]["ram_bytes"] == 512 * MiB
    assert vm["balloon"]["actual_bytes"] == 512 * MiB
    assert vm["balloon"]["free_page_reporting"] is True
    assert vm["pid"] == guest.pid
    guest.wait_ready(180)

    balloon_round_trip(rd, "g1")

    guest.kill()
    killed_at = time.monotonic()
    rd.wait_for(lambda: rd.metric("qemu_vm_up", vm="g1") == 0, 1 + 1.5, "qemu_vm_up 0 after kill")
    assert time.monotonic() - killed_at <= 2.5

    boot_guest(QemuGuestSpec(name="g1", qmp_path=qmp), ready=False)
    rd.wait_for(lambda: rd.metric("qemu_vm_up", vm="g1") == 1, 60, "reattach after restart")
    assert rd.metric("reclaimd_qmp_reconnects_total", vm="g1") == 1
    vm = rd.get("/api/v1/vms/g1")
    assert vm["reconnects"] == 1


def test_listen_mode(
    boot_guest: BootGuest, reclaimd: Callable[..., ReclaimdProcess], short_dir: Path
) -> None:
    listen = short_dir / "reclaimd.sock"
    rd = reclaimd("--listen-socket", str(listen))
    booted_at = time.time()
    guest = boot_guest(QemuGuestSpec(name="lg1", qmp="client", qmp_path=listen), ready=False)
    vm = wait_attached_with_stats(rd, "lg1", booted_at)
    assert vm["attach"] == "listen" and vm["uuid"] == guest.spec.uuid
    balloon_round_trip(rd, "lg1")
    guest.kill()
    rd.wait_for(lambda: rd.metric("qemu_vm_up", vm="lg1") == 0, 3, "qemu_vm_up 0 after kill")
    boot_guest(
        QemuGuestSpec(name="lg1", qmp="client", qmp_path=listen, uuid=guest.spec.uuid), ready=False
    )
    rd.wait_for(lambda: rd.metric("qemu_vm_up", vm="lg1") == 1, 60, "QEMU reconnects to us")


def test_poll_mode_and_a_guest_without_balloon_driver(
    boot_guest: BootGuest, reclaimd: Callable[..., ReclaimdProcess], short_dir: Path
) -> None:
    polled, nodriver = short_dir / "p1.qmp", short_dir / "nd.qmp"
    booted_at = time.time()
    boot_guest(QemuGuestSpec(name="p1", qmp_path=polled), ready=False)
    boot_guest(QemuGuestSpec(name="nd", qmp_path=nodriver, noballoon=True), ready=False)
    rd = reclaimd("--vm", f"p1=poll+unix:{polled}", "--vm", f"nd=unix:{nodriver}")
    vm = wait_attached_with_stats(rd, "p1", booted_at)
    assert vm["attach"] == "poll"
    balloon_round_trip(rd, "p1", events_expected=False)

    nd = rd.get("/api/v1/vms/nd")
    assert nd["up"] and nd["balloon"]["present"]
    assert nd["guest_free_bytes"] is None
    assert "not reported" in nd["guest_stats_problem"]
    assert rd.metric("qemu_guest_memory_free_bytes", vm="nd") is None
    # Without statistics nothing tells how low is safe: refused unless forced.
    reply = rd.post("/api/v1/vms/nd/balloon", {"target_bytes": 300 * MiB})
    assert reply.status_code == 422 and "force" in reply.json()["detail"], reply.text
    reply = rd.post("/api/v1/vms/nd/balloon", {"target_bytes": 300 * MiB, "force": True})
    assert reply.status_code == 202  # QEMU accepts; nothing moves without a driver
    time.sleep(3)
    assert rd.metric("qemu_balloon_actual_bytes", vm="nd") == 512 * MiB
    assert rd.get("/api/v1/vms/p1")["up"]  # the other VM is served throughout
