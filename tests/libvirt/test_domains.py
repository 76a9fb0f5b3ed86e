"""libvirt domains as VMs of the daemon, on libvirt's in-process test driver (``test:///default``):
the real library and its events, with no daemon and no QEMU (the e2e tests have both).

``test:///default`` is one shared state per process, with a running domain named ``test``;
each test defines its own domains and removes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from daemon.config import Settings
from daemon.domains import LIBVIRT_TRANSITIONS, LibvirtSession
from daemon.domains.monitor import apply_facts, ram_layout
from daemon.fleet import SessionState, VMState
from daemon.host.ramblocks import parse_ramblocks, select_guest_ram
from daemon.libvirt import RECLAIMD_NS, parse_domain_xml
from daemon.qmp.errors import CommandFailed
from daemon.service import BelowFloor, Reclaimd, VMUnavailable

TEST_URI = "test:///default"
AFFECT_LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
MiB = 1 << 20
S = SessionState


def domain_xml(name: str, uuid: str, *, balloon: bool = True, nova: str = "") -> str:
    devices = "<devices><memballoon model='virtio'><stats period='2'/></memballoon></devices>"
    metadata = f"<metadata>{nova}</metadata>" if nova else ""
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>{metadata}"
        "<memory unit='MiB'>128</memory><os><type>hvm</type></os>"
        f"{devices if balloon else ''}</domain>"
    )


NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
NOVA = (
    f"<nova:instance xmlns:nova='{NOVA_NS}'>"
    "<nova:name>web-1</nova:name><nova:flavor name='m1.small'/>"
    "<nova:owner><nova:project uuid='p-1'>demo</nova:project></nova:owner></nova:instance>"
)
NOVA_LABELS = {
    "instance_name": "web-1",
    "flavor": "m1.small",
    "project_name": "demo",
    "project_uuid": "p-1",
}


# -- the RAM layout the host view gets from the XML ---------------------------------------------


def test_plain_ram_is_one_block_of_the_domain_s_memory() -> None:
    facts = parse_domain_xml(domain_xml("d", str(uuidlib.uuid4())))
    layout = ram_layout(facts)
    assert layout is not None
    table, memdevs = layout
    (block,) = parse_ramblocks(table)
    assert (block.name, block.total, block.used, block.page_size) == (
        "pc.ram",
        128 * MiB,
        128 * MiB,
        4096,
    )
    chosen = select_guest_ram(parse_ramblocks(table), memdevs, 128 * MiB)
    assert isinstance(chosen, list) and [g.name for g in chosen] == ["pc.ram"]


def test_numa_cells_and_dimms_and_shared_memfd() -> None:
    facts = parse_domain_xml(
        "<domain type='kvm'><name>d</name><uuid>6b1f5d4e-0000-4000-8000-000000000001</uuid>"
        "<maxMemory slots='4' unit='MiB'>8192</maxMemory>"
        "<memory unit='MiB'>3072</memory>"
        "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
        "<cpu><numa><cell id='0' cpus='0' memory='1024' unit='MiB'/>"
        "<cell id='1' cpus='1' memory='1024' unit='MiB'/></numa></cpu>"
        "<devices><memory model='dimm'><target><size unit='MiB'>1024</size><node>0</node>"
        "</target></memory></devices></domain>"
    )
    layout = ram_layout(facts)
    assert layout is not None
    table, memdevs = layout
    blocks = parse_ramblocks(table)
    assert [(b.name, b.offset, b.total) for b in blocks] == [
        ("ram-node0", 0, 1024 * MiB),
        ("ram-node1", 1024 * MiB, 1024 * MiB),
    ]
    assert all(m["share"] is True for m in memdevs)
    vm = VMState("d", "libvirt:x", "libvirt")
    apply_facts(vm, facts)
    assert (vm.memory.base_bytes, vm.memory.plugged_bytes) == (2048 * MiB, 1024 * MiB)


def test_no_balloon_and_nova_labels() -> None:
    facts = parse_domain_xml(domain_xml("d", str(uuidlib.uuid4()), balloon=False, nova=NOVA))
    vm = VMState("d", "libvirt:x", "libvirt")
    apply_facts(vm, facts, nova=True)
    assert vm.balloon.present is False and vm.balloon.problem == "no virtio-balloon device"
    assert vm.labels == NOVA_LABELS
    apply_facts(vm, facts)  # not asked for: none
    assert vm.labels == {}


# -- the daemon on the test driver ---------------------------------------------------------------


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Reclaimd]:
    settings = Settings(libvirt=TEST_URI, journal=tmp_path / "journal.sqlite3", poll_interval=0.2)
    rd = Reclaimd(settings, host_view=False)
    await rd.start()
    yield rd
    await rd.stop()


async def until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout:g} s: {what}")
        await asyncio.sleep(0.02)


async def test_a_domain_s_life_in_the_fleet(daemon: Reclaimd, admin: libvirt.virConnect) -> None:
    # The test driver's own running domain is there from the first snapshot.
    await until(lambda: (vm := daemon.fleet.get("test")) is not None and vm.up, "test attached")
    uuid = str(uuidlib.uuid4())
    dom = admin.defineXML(domain_xml("rd-unit", uuid, nova=NOVA))
    try:
        await until(lambda: "rd-unit" in daemon.fleet, "the defined domain listed")
        vm = daemon.fleet.get("rd-unit")
        assert vm is not None and vm.attach == "libvirt" and not vm.up
        dom.create()
        await until(lambda: vm.up, "attached once started")
        assert vm.uuid == uuid
        assert vm.labels == {}  # Nova's labels only when asked for
        assert vm.memory.ram_bytes == 128 * MiB
        assert vm.balloon.present and vm.balloon.stats_polling_interval == 2
        await until(lambda: vm.balloon.actual_bytes == 128 * MiB, "balloon read")
        assert vm.event_counts.get("LIFECYCLE_STARTED") == 1

        # The API's balloon call: setMemoryFlags(AFFECT_LIVE), journalled.
        with pytest.raises(BelowFloor):  # no stats from this driver, no configured floor
            await daemon.set_balloon("rd-unit", 64 * MiB, requester="t")
        await daemon.set_balloon("rd-unit", 64 * MiB, requester="t", force=True)
        assert dom.info()[2] == 64 * 1024
        await until(lambda: vm.balloon.actual_bytes == 64 * MiB, "balloon followed")
        entries = await daemon.events("rd-unit", since=None, before_id=None, limit=50)
        assert any(e.kind == "request" and e.name == "balloon" for e in entries)

        dom.destroy()
        await until(lambda: not vm.up, "down once destroyed")
        assert "destroyed" in (vm.last_error or "")
        with pytest.raises(VMUnavailable, match="not attached"):
            await daemon.set_balloon("rd-unit", 64 * MiB, requester="t", force=True)
        session = daemon.sessions["rd-unit"]
        assert isinstance(session, LibvirtSession)
        dom.create()
        await until(lambda: vm.up, "attached again")
        assert daemon.fleet.get("rd-unit") is vm  # the same record: history kept
        assert vm.reconnects == 1
        dom.destroy()
        await until(lambda: not vm.up, "down again")
        assert list(session.transitions) == [
            S.IDLE, S.DISCONNECTED, S.ATTACHING, S.RUNNING, S.DISCONNECTED,
            S.ATTACHING, S.RUNNING, S.DISCONNECTED,
        ]  # fmt: skip
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    await until(lambda: "rd-unit" not in daemon.fleet, "gone once undefined")
    assert "rd-unit" not in daemon.sessions


async def test_a_transient_domain_goes_when_it_stops(
    daemon: Reclaimd, admin: libvirt.virConnect
) -> None:
    dom = admin.createXML(domain_xml("rd-transient", str(uuidlib.uuid4())))
    await until(lambda: (vm := daemon.fleet.get("rd-transient")) is not None and vm.up, "up")
    dom.destroy()
    await until(lambda: "rd-transient" not in daemon.fleet, "gone once stopped")


async def test_no_command_but_balloon_reaches_a_domain(daemon: Reclaimd) -> None:
    await until(lambda: (vm := daemon.fleet.get("test")) is not None and vm.up, "test attached")
    session = daemon.sessions["test"]
    assert not daemon.settings.libvirt_qmp_passthrough  # off by default
    with pytest.raises(CommandFailed, match="not offered"):
        await session.command("human-monitor-command", {"command-line": "info mtree"})


async def test_qmp_passthrough_on_a_driver_without_a_monitor_still_attaches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # test:/// has no QEMU monitor (virDomainQemuMonitorCommand is unsupported there): the
    # attach goes on without what only QMP tells, and the API still sends only balloons. The
    # private libvirtd's real domain is where passthrough works (test_daemon_e2e.py).
    settings = Settings(
        libvirt=TEST_URI,
        journal=tmp_path / "j.sqlite3",
        poll_interval=0.2,
        libvirt_qmp_passthrough=True,
    )
    caplog.set_level(logging.INFO, logger="daemon.domains.session")
    rd = Reclaimd(settings, host_view=False)
    await rd.start()
    try:
        await until(lambda: (vm := rd.fleet.get("test")) is not None and vm.up, "test attached")
        vm = rd.fleet.get("test")
        assert vm is not None and vm.memory.mtree_text is None
        assert vm.balloon.free_page_hint is None
        warned = [r for r in caplog.records if "QMP passthrough is on" in r.getMessage()]
        assert [r.levelname for r in warned] == ["WARNING"]
        assert any("virDomainQemuMonitorCommand" in r.getMessage() for r in caplog.records)
        with pytest.raises(CommandFailed, match="not offered"):
            await rd.sessions["test"].command("query-status", {})
    finally:
        await rd.stop()


async def test_a_domain_defined_before_reclaimd_starts_is_listed_down(
    tmp_path: Path, admin: libvirt.virConnect
) -> None:
    uuid = str(uuidlib.uuid4())
    dom = admin.defineXML(domain_xml("rd-early", uuid))
    try:
        settings = Settings(libvirt=TEST_URI, journal=tmp_path / "j.sqlite3", poll_interval=0.2)
        rd = Reclaimd(settings, host_view=False)
        await rd.start()
        try:
            # As one defined while reclaimd runs: listed from the first snapshot, down.
            await until(lambda: "rd-early" in rd.fleet, "the domain defined before listed")
            vm = rd.fleet.get("rd-early")
            assert vm is not None and vm.attach == "libvirt" and vm.uuid == uuid
            await until(lambda: vm.session_state == S.DISCONNECTED, "down: not running")
            assert not vm.up and vm.attached_at is None
            dom.create()
            await until(lambda: vm.up, "attached once started")
            assert rd.fleet.get("rd-early") is vm
        finally:
            await rd.stop()
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def info_labels(metrics: str, vm: str) -> dict[str, str]:
    """The labels of the VM's ``qemu_vm_info`` sample."""
    (labels,) = [
        sample.labels
        for family in text_string_to_metric_families(metrics)
        if family.name == "qemu_vm_info"
        for sample in family.samples
        if sample.labels.get("vm") == vm
    ]
    return labels


@pytest.mark.parametrize("nova", [True, False], ids=["nova-on", "nova-off"])
async def test_nova_labels_in_metrics_only_when_asked_for_and_followed_on_change(
    tmp_path: Path, admin: libvirt.virConnect, nova: bool
) -> None:
    settings = Settings(
        libvirt=TEST_URI,
        journal=tmp_path / "j.sqlite3",
        poll_interval=0.2,
        libvirt_nova_metadata=nova,
    )
    rd = Reclaimd(settings, host_view=False)
    await rd.start()
    dom = admin.createXML(domain_xml("rd-nova", str(uuidlib.uuid4()), nova=NOVA))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(settings, rd)), base_url="http://test"
    )
    try:
        await until(lambda: (vm := rd.fleet.get("rd-nova")) is not None and vm.up, "attached")
        vm = rd.fleet.get("rd-nova")
        assert vm is not None
        labels = info_labels((await client.get("/metrics")).text, "rd-nova")
        assert labels["uuid"] == vm.uuid
        if nova:
            assert NOVA_LABELS.items() <= labels.items(), labels
        else:
            assert not set(NOVA_LABELS) & set(labels), labels

        # Nova changes its element on the running domain (a rename, a resize): METADATA_CHANGE
        # in Nova's namespace, which reclaimd follows when it exports the labels.
        renamed = "<instance><name>web-2</name><flavor name='m1.large'/></instance>"
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, renamed, "nova", NOVA_NS, AFFECT_LIVE)
        if nova:
            await until(lambda: vm.labels.get("instance_name") == "web-2", "the new name")
            labels = info_labels((await client.get("/metrics")).text, "rd-nova")
            assert (labels["instance_name"], labels["flavor"]) == ("web-2", "m1.large")
            assert "project_name" not in labels  # the new element has no owner
        else:
            # Then reclaimd's own element: its re-read comes after the Nova change's, and must
            # not bring Nova's labels either.
            options = "<vm><reclaim enabled='no'/></vm>"
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, options, "reclaimd", RECLAIMD_NS, AFFECT_LIVE
            )
            await until(lambda: vm.options.reclaim is False, "reclaimd's options re-read")
            assert vm.event_counts.get("METADATA_CHANGE") == 2
            assert vm.labels == {}
            labels = info_labels((await client.get("/metrics")).text, "rd-nova")
            assert not set(NOVA_LABELS) & set(labels), labels
    finally:
        await client.aclose()
        dom.destroy()
        await rd.stop()


def test_the_transition_table_is_closed() -> None:
    for state, targets in LIBVIRT_TRANSITIONS.items():
        assert targets <= set(LIBVIRT_TRANSITIONS), state
    assert LIBVIRT_TRANSITIONS[S.STOPPED] == frozenset()
