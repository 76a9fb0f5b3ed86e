"""``reclaimd serve --libvirt URI`` against the private libvirtd and real QEMU domains.

The domains are the real test guest (``type='qemu'``, free page reporting on, the agent on its
channel) and cheap paused ones, none with a ``<qemu:commandline>``: reclaimd sees them only
through libvirt's API. The tests of this module share one reclaimd, started once the booted
domain is up, and run in order (the libvirtd restart last).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.libvirt import RECLAIMD_NS
from tests.e2e.reclaimd_proc import ReclaimdProcess
from tests.libvirt import domains
from tests.libvirt.conftest import BootedDomain
from tests.libvirt.domains import DomainSpec, dommemstat
from tests.libvirt.libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.e2e

MiB = 1 << 20
KiB = 1024
POLL = 1.0  # RECLAIMD_POLL_INTERVAL of ReclaimdProcess


@pytest.fixture(scope="module")
def rd(booted: BootedDomain, libvirtd: PrivateLibvirtd) -> Iterator[ReclaimdProcess]:
    workdir = Path(tempfile.mkdtemp(prefix="rd-lv-"))
    started = time.monotonic()
    proc = ReclaimdProcess(workdir, ["--libvirt", libvirtd.uri])
    try:
        proc.wait_for(lambda: vm(proc, booted.spec.name).get("up"), 15, "the domain attached")
        assert time.monotonic() - started < 15
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def vm(rd: ReclaimdProcess, name: str) -> dict[str, Any]:
    reply = rd.client.get(f"/api/v1/vms/{name}")
    if reply.status_code == 404:
        return {}
    reply.raise_for_status()
    body: dict[str, Any] = reply.json()
    return body


def names(rd: ReclaimdProcess) -> set[str]:
    return {v["name"] for v in rd.get("/api/v1/vms")["vms"]}


def test_the_booted_domain_is_attached_through_libvirt(
    rd: ReclaimdProcess, booted: BootedDomain, libvirtd: PrivateLibvirtd
) -> None:
    name, spec = booted.spec.name, booted.spec
    detail = vm(rd, name)
    assert detail["attach"] == "libvirt"
    assert detail["uuid"] == spec.uuid
    assert detail["session_state"] == "running"
    assert detail["ram_bytes"] == spec.ram_mib * MiB
    balloon = detail["balloon"]
    assert balloon["present"] is True
    assert balloon["free_page_reporting"] is True
    assert balloon["stats_polling_interval"] == spec.stats_period
    # QEMU's pid from libvirt, and the host view on it.
    assert isinstance(detail["pid"], int)
    assert f"-uuid\0{spec.uuid}".encode() in Path(f"/proc/{detail['pid']}/cmdline").read_bytes()
    rd.wait_for(lambda: (vm(rd, name).get("host") or {}).get("scans", 0) >= 2, 30, "host scans")
    assert rd.metric("qemu_vm_up", vm=name) == 1.0
    info = rd.metric("qemu_vm_info", vm=name, uuid=spec.uuid, qemu_version="", attach="libvirt")
    assert info == 1.0
    # No QMP passthrough unless asked for: libvirt would mark the domain tainted in its log.
    assert balloon["free_page_hint"] is None  # only QMP tells it
    assert "custom-monitor" not in domain_log(libvirtd, name)


def domain_log(libvirtd: PrivateLibvirtd, name: str) -> str:
    """libvirt's log of the domain (QEMU's command line, its stderr, and taint lines)."""
    return (libvirtd.root / "log" / "qemu" / f"{name}.log").read_text(errors="replace")


def test_stats_and_balloon_equal_virsh_dommemstat(
    rd: ReclaimdProcess, booted: BootedDomain, libvirtd: PrivateLibvirtd
) -> None:
    name = booted.spec.name
    deadline = time.monotonic() + 60
    while True:
        # virsh, reclaimd, virsh: the same stats update when all three carry its stamp.
        before = dommemstat(libvirtd, name)
        ours = vm(rd, name)
        after = dommemstat(libvirtd, name)
        stats = ours.get("guest_stats") or {}
        stamp = stats.get("last_update")
        if stamp is not None and before.get("last_update") == after.get("last_update") == stamp:
            break
        assert time.monotonic() < deadline, f"no stable stats: {before} {stats} {after}"
        time.sleep(0.3)
    assert stats["valid"], stats["problems"]
    assert ours["balloon"]["actual_bytes"] == after["actual"] * KiB
    assert stats["free_bytes"] == after["unused"] * KiB
    assert stats["available_bytes"] == after["usable"] * KiB  # MemAvailable
    assert stats["total_bytes"] == after["available"] * KiB  # libvirt's "available" is the total
    assert stats["disk_caches_bytes"] == after["disk_caches"] * KiB
    assert stats["last_update"] == after["last_update"]


def test_a_balloon_change_through_the_api_converges(
    rd: ReclaimdProcess, booted: BootedDomain, libvirtd: PrivateLibvirtd
) -> None:
    name, full = booted.spec.name, booted.spec.ram_mib * MiB
    target = 200 * MiB
    reply = rd.post(f"/api/v1/vms/{name}/balloon", {"target_bytes": target})
    assert reply.status_code == 202, reply.text
    try:
        rd.wait_for(
            lambda: vm(rd, name)["balloon"]["actual_bytes"] == target, 60, "the balloon at target"
        )
        assert dommemstat(libvirtd, name)["actual"] * KiB == target
        assert rd.metric("qemu_balloon_target_bytes", vm=name) == target
        assert rd.metric("qemu_balloon_actual_bytes", vm=name) == target
        events = rd.get(f"/api/v1/vms/{name}/events")["events"]
        assert any(e["kind"] == "request" and e["name"] == "balloon" for e in events)
        assert any(e["kind"] == "event" and e["name"] == "BALLOON_CHANGE" for e in events)
    finally:
        reply = rd.post(f"/api/v1/vms/{name}/balloon", {"target_bytes": full})
        assert reply.status_code == 202, reply.text
    rd.wait_for(lambda: vm(rd, name)["balloon"]["actual_bytes"] == full, 60, "the balloon back")
    # Without the token, nothing moves.
    assert rd.post(f"/api/v1/vms/{name}/balloon", {"target_bytes": target}, None).status_code in (
        401,
        403,
    )


def test_reported_ranges_rise_after_the_guest_frees_memory(
    rd: ReclaimdProcess, booted: BootedDomain
) -> None:
    name = booted.spec.name
    booted.control.send("alloc 100", timeout=60)
    since = time.time()
    rd.wait_for(
        lambda: (vm(rd, name).get("host") or {}).get("at", 0) > since + 2, 30, "a scan after alloc"
    )
    before = vm(rd, name)["host"]["reported_bytes"]
    booted.control.send("free", timeout=60)
    rd.wait_for(
        lambda: vm(rd, name)["host"]["reported_bytes"] - before >= 80 * MiB,
        30,
        "reported bytes to rise by 80 MiB",
    )
    ranges = rd.get(f"/api/v1/vms/{name}/reported-ranges")["ranges"]
    assert sum(r["length"] for r in ranges if r["at"] > since) >= 80 * MiB
    reported = rd.metric("qemu_reported_absent_bytes", vm=name)
    assert reported is not None and reported >= 80 * MiB


def test_the_guest_agent_is_read_through_libvirt(rd: ReclaimdProcess, booted: BootedDomain) -> None:
    name = booted.spec.name
    agent = rd.wait_for(
        lambda: (a := vm(rd, name).get("agent")) and a.get("ok") and a, 90, "an agent read"
    )
    assert agent["path"].startswith("libvirt")
    assert agent["reporting_order"] is not None
    assert sum(agent["free_by_order_bytes"]) > 0


def test_reclaimd_metadata_on_the_running_domain_applies_at_once(
    rd: ReclaimdProcess, booted: BootedDomain, libvirtd: PrivateLibvirtd
) -> None:
    name = booted.spec.name

    def advice() -> dict[str, Any]:
        body: dict[str, Any] = rd.get(f"/api/v1/vms/{name}/advice")
        return body

    options = '<vm><reclaim enabled="no"/><minimum unit="MiB">200</minimum></vm>'
    libvirtd.virsh("metadata", name, RECLAIMD_NS, "--key", "reclaimd", "--live", "--set", options)
    set_ = rd.wait_for(
        lambda: (a := advice())["options_source"] == "libvirt metadata" and a,
        10,
        "the domain's reclaimd metadata in its advice",
    )
    assert set_["reclaim"] is False
    assert set_["minimum_bytes"] == 200 * MiB
    libvirtd.virsh("metadata", name, RECLAIMD_NS, "--live", "--remove")
    cleared = rd.wait_for(
        lambda: (a := advice())["options_source"] is None and a, 10, "the metadata's removal"
    )
    assert cleared["reclaim"] is True and cleared["minimum_bytes"] is None


def test_destroy_start_define_and_undefine(rd: ReclaimdProcess, libvirtd: PrivateLibvirtd) -> None:
    spec = DomainSpec(name="rd-life", ram_mib=64)
    domains.define(spec, libvirtd)
    try:
        # Defined while reclaimd runs: the VM appears, down.
        rd.wait_for(lambda: spec.name in names(rd), 10, "the defined domain listed")
        assert vm(rd, spec.name)["up"] is False
        started = time.monotonic()
        domains.start(spec, libvirtd, paused=True)
        rd.wait_for(lambda: vm(rd, spec.name)["up"], 15, "attach after virsh start")
        assert time.monotonic() - started < 15
        assert vm(rd, spec.name)["uuid"] == spec.uuid
        assert rd.metric("qemu_vm_up", vm=spec.name) == 1.0

        libvirtd.virsh("destroy", spec.name)  # returns once QEMU is gone
        destroyed = time.monotonic()
        rd.wait_for(lambda: rd.metric("qemu_vm_up", vm=spec.name) == 0.0, 5, "up 0")
        # The lifecycle event, not a failed poll, takes it down: within one poll.
        assert time.monotonic() - destroyed <= POLL
        detail = vm(rd, spec.name)
        assert "destroyed" in (detail["last_error"] or "")

        domains.start(spec, libvirtd, paused=True)
        rd.wait_for(lambda: rd.metric("qemu_vm_up", vm=spec.name) == 1.0, 15, "up again")
        assert vm(rd, spec.name)["reconnects"] >= 1
        libvirtd.virsh("destroy", spec.name)
        rd.wait_for(lambda: rd.metric("qemu_vm_up", vm=spec.name) == 0.0, 5, "up 0 again")
    finally:
        libvirtd.virsh("destroy", spec.name, check=False)
        libvirtd.virsh("undefine", spec.name, check=False)
    # Undefined: the VM goes, from the API and from /metrics.
    rd.wait_for(lambda: spec.name not in names(rd), 10, "the undefined domain gone")
    assert rd.metric("qemu_vm_up", vm=spec.name) is None


def test_a_transient_domain_goes_when_it_stops(
    rd: ReclaimdProcess, libvirtd: PrivateLibvirtd
) -> None:
    spec = DomainSpec(name="rd-transient", ram_mib=64)
    path = libvirtd.root / f"{spec.name}.xml"
    path.write_text(domains.domain_xml(spec, libvirtd))
    libvirtd.virsh("create", str(path), "--paused")
    try:
        rd.wait_for(lambda: vm(rd, spec.name).get("up"), 15, "the transient domain attached")
    finally:
        libvirtd.virsh("destroy", spec.name, check=False)
    rd.wait_for(lambda: spec.name not in names(rd), 10, "the stopped transient domain gone")


def test_qmp_passthrough_when_asked_for_taints_and_tells_guest_physical_addresses(
    rd: ReclaimdProcess, booted: BootedDomain, libvirtd: PrivateLibvirtd
) -> None:
    name = booted.spec.name
    workdir = Path(tempfile.mkdtemp(prefix="rd-lv-qmp-"))
    # A second reclaimd beside the first: libvirt serves both, and the first stays untainted.
    qmp = ReclaimdProcess(workdir, ["--libvirt", libvirtd.uri, "--libvirt-qmp-passthrough"])
    try:
        qmp.wait_for(lambda: vm(qmp, name).get("up"), 15, "the domain attached")
        detail = vm(qmp, name)
        assert detail["balloon"]["free_page_hint"] is False  # qom-get through libvirt
        assert "custom-monitor" in domain_log(libvirtd, name)  # libvirt's own taint record
        warnings = [
            line
            for line in qmp.log.read_text(errors="replace").splitlines()
            if "WARNING" in line and "QMP passthrough" in line
        ]
        assert len(warnings) == 1 and name in warnings[0] and "tainted" in warnings[0], warnings

        # info mtree -f through libvirt: reported ranges get guest-physical addresses, which
        # the first reclaimd (no passthrough) cannot tell.
        since = time.time()
        booted.control.send("alloc 60", timeout=60)
        booted.control.send("free", timeout=60)
        qmp.wait_for(
            lambda: any(
                r["at"] > since for r in qmp.get(f"/api/v1/vms/{name}/reported-ranges")["ranges"]
            ),
            60,
            "ranges reported after the free",
        )
        fresh = [
            r for r in qmp.get(f"/api/v1/vms/{name}/reported-ranges")["ranges"] if r["at"] > since
        ]
        assert fresh and all(isinstance(r["gpa"], int) for r in fresh), fresh[:3]
        plain = rd.get(f"/api/v1/vms/{name}/reported-ranges")["ranges"]
        assert plain and all(r["gpa"] is None for r in plain), plain[:3]
    finally:
        qmp.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_libvirtd_restart_keeps_the_vms_and_reattaches_them(
    rd: ReclaimdProcess, booted: BootedDomain, libvirtd: PrivateLibvirtd
) -> None:
    spec = DomainSpec(name="rd-paused", ram_mib=64)
    domains.define(spec, libvirtd)
    domains.start(spec, libvirtd, paused=True)
    try:
        running = (booted.spec.name, spec.name)
        for name in running:
            rd.wait_for(lambda n=name: vm(rd, n).get("up"), 15, f"{name} attached")
        before = vm(rd, booted.spec.name)
        libvirtd.kill_libvirtd()
        try:
            # Serving meanwhile: every VM is still listed, down with the cause.
            rd.wait_for(
                lambda: not any(vm(rd, n)["up"] for n in running), 30, "down while libvirtd is away"
            )
            assert set(running) <= names(rd)
            assert rd.client.get("/healthz").status_code == 200
            assert "libvirtd" in (vm(rd, booted.spec.name)["last_error"] or "")
        finally:
            libvirtd.spawn_libvirtd()
        libvirtd.wait_answering()
        answering = time.monotonic()
        for name in running:
            rd.wait_for(lambda n=name: vm(rd, n)["up"], 10, f"{name} reattached")
        assert time.monotonic() - answering < 10
        after = vm(rd, booted.spec.name)
        # The same VM record: its history and counts were kept.
        assert after["attached_at"] > before["attached_at"]
        assert after["reconnects"] == before["reconnects"] + 1
        assert after["pid"] == before["pid"]
        for event, count in before["event_counts"].items():
            assert after["event_counts"].get(event, 0) >= count
        assert after["host"]["scans"] >= before["host"]["scans"]
        assert after["host"]["reported_bytes"] >= before["host"]["reported_bytes"]
    finally:
        libvirtd.virsh("destroy", spec.name, check=False)
        libvirtd.virsh("undefine", spec.name, check=False)
