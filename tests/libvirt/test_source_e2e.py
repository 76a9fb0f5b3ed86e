"""The libvirt source against a real libvirtd and real QEMU domains (the real test guest).

No domain carries a ``<qemu:commandline>``: everything goes through libvirt's API.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.libvirt import (
    NOVA_NS_PREFIX,
    RECLAIMD_NS,
    AgentUnavailable,
    BalloonChanged,
    ConnectionLost,
    DomainNotFound,
    DomainRef,
    LibvirtSource,
    Lifecycle,
    LifecycleChanged,
    MetadataChanged,
    NotConnected,
    Reconnected,
    SourceState,
)
from daemon.testguest import GuestImage, fields
from tests.libvirt import domains
from tests.libvirt.conftest import BootedDomain
from tests.libvirt.domains import DomainSpec, dommemstat
from tests.libvirt.libvirtd import PrivateLibvirtd
from tests.libvirt.tap import EventTap

pytestmark = pytest.mark.e2e

MiB = 1 << 20
KiB = 1024


def lifecycle(
    uuid: str, event: Lifecycle, detail: str | None = None
) -> Callable[[LifecycleChanged], bool]:
    def match(e: LifecycleChanged) -> bool:
        return e.domain.uuid == uuid and e.event == event and detail in (None, e.detail)

    return match


async def running_ref(source: LibvirtSource, uuid: str) -> DomainRef:
    refs = {r.uuid: r for r in await source.list_running()}
    assert uuid in refs, f"{uuid} not among the running domains {list(refs.values())}"
    return refs[uuid]


# -- lifecycle -----------------------------------------------------------------------------------


async def test_start_and_destroy_emit_lifecycle_events_and_the_pid_follows(
    source: LibvirtSource, libvirtd: PrivateLibvirtd, libvirt_guest_image: GuestImage
) -> None:
    spec = DomainSpec(name="rd-life", ram_mib=64)
    async with EventTap(source) as tap:
        domains.define(spec, libvirtd)
        await tap.wait_for(LifecycleChanged, lifecycle(spec.uuid, Lifecycle.DEFINED, "added"))
        try:
            domains.start(spec, libvirtd, paused=True)
            started = await tap.wait_for(
                LifecycleChanged, lifecycle(spec.uuid, Lifecycle.STARTED, "booted")
            )
            ref = await running_ref(source, spec.uuid)
            assert ref.name == spec.name and ref.id is not None and started.domain == ref
            pid = await source.qemu_pid(ref)
            pidfile = libvirtd.qemu_state_dir / f"{spec.name}.pid"
            assert pid is not None and pid == int(pidfile.read_text())
            assert await asyncio.to_thread(Path(f"/proc/{pid}").exists)

            libvirtd.virsh("destroy", spec.name)
            await tap.wait_for(
                LifecycleChanged, lifecycle(spec.uuid, Lifecycle.STOPPED, "destroyed")
            )
            assert spec.uuid not in {r.uuid for r in await source.list_running()}
            assert await source.qemu_pid(ref) is None
        finally:
            libvirtd.virsh("destroy", spec.name, check=False)
            libvirtd.virsh("undefine", spec.name, check=False)
        await tap.wait_for(LifecycleChanged, lifecycle(spec.uuid, Lifecycle.UNDEFINED, "removed"))


async def test_a_killed_qemu_is_stopped_failed(
    source: LibvirtSource, libvirtd: PrivateLibvirtd, libvirt_guest_image: GuestImage
) -> None:
    spec = DomainSpec(name="rd-crash", ram_mib=64)
    domains.define(spec, libvirtd)
    try:
        async with EventTap(source) as tap:
            domains.start(spec, libvirtd, paused=True)
            await tap.wait_for(LifecycleChanged, lifecycle(spec.uuid, Lifecycle.STARTED))
            pid = await source.qemu_pid(await running_ref(source, spec.uuid))
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            stopped = await tap.wait_for(LifecycleChanged, lifecycle(spec.uuid, Lifecycle.STOPPED))
            assert stopped.detail in ("failed", "crashed"), stopped
    finally:
        libvirtd.virsh("destroy", spec.name, check=False)
        libvirtd.virsh("undefine", spec.name, check=False)


async def test_calls_on_a_domain_that_is_gone(
    source: LibvirtSource, libvirtd: PrivateLibvirtd, libvirt_guest_image: GuestImage
) -> None:
    spec = DomainSpec(name="rd-gone", ram_mib=64)
    domains.define(spec, libvirtd)
    try:
        domains.start(spec, libvirtd, paused=True)
        await running_ref(source, spec.uuid)
        assert (await source.info(spec.uuid)).state == "paused"
    finally:
        libvirtd.virsh("destroy", spec.name, check=False)
        libvirtd.virsh("undefine", spec.name, check=False)
    with pytest.raises(DomainNotFound):
        await source.memory_stats(spec.uuid)


# -- numbers that agree with virsh and with the guest ---------------------------------------------


async def test_memory_stats_equal_virsh_dommemstat_at_the_same_update(
    booted: BootedDomain, source: LibvirtSource, libvirtd: PrivateLibvirtd
) -> None:
    uuid, name = booted.spec.uuid, booted.spec.name
    ram = (await source.info(uuid)).max_memory_bytes
    assert ram == booted.spec.ram_mib * MiB
    # Read virsh, reclaimd, virsh: the three agree on last_update unless a 2 s update fell in
    # between; then try again.
    deadline = time.monotonic() + 60
    while True:
        before = dommemstat(libvirtd, name)
        ours = await source.memory_stats(uuid, ram_bytes=ram)
        after = dommemstat(libvirtd, name)
        stamp = ours.guest.last_update
        if stamp is not None and before.get("last_update") == after.get("last_update") == stamp:
            break
        assert time.monotonic() < deadline, f"no stable stats: {before} {ours} {after}"
        await asyncio.sleep(0.3)
    guest = ours.guest
    assert guest.valid, guest.problems
    assert guest.free_bytes == after["unused"] * KiB
    assert guest.available_bytes == after["usable"] * KiB
    assert guest.total_bytes == after["available"] * KiB  # libvirt's "available" is the total
    assert guest.disk_caches_bytes == after["disk_caches"] * KiB
    assert guest.major_faults == after["major_fault"]
    assert guest.minor_faults == after["minor_fault"]
    assert guest.swap_in_bytes == after["swap_in"] * KiB
    assert ours.balloon_actual_bytes == after["actual"] * KiB
    # And the guest's own /proc/meminfo: its MemTotal is the balloon stats' total.
    status = fields(booted.control.send("status"))
    assert guest.total_bytes == int(status["memtotal_kib"]) * KiB


async def test_balloon_target_emits_balloon_change_and_shows_everywhere(
    booted: BootedDomain, source: LibvirtSource, libvirtd: PrivateLibvirtd
) -> None:
    uuid, name = booted.spec.uuid, booted.spec.name
    full = booted.spec.ram_mib * MiB
    target = 200 * MiB
    async with EventTap(source) as tap:
        await source.set_balloon_target(uuid, target)
        try:
            # QEMU rate-limits BALLOON_CHANGE; the last one shows the guest at the target.
            event = await tap.wait_for(
                BalloonChanged, lambda e: e.domain.uuid == uuid and e.actual_bytes == target, 60
            )
            assert event.domain.name == name
            assert (await source.info(uuid)).memory_bytes == target
            assert (await source.memory_stats(uuid)).balloon_actual_bytes == target
            assert dommemstat(libvirtd, name)["actual"] * KiB == target
        finally:
            await source.set_balloon_target(uuid, full)
        await tap.wait_for(
            BalloonChanged, lambda e: e.domain.uuid == uuid and e.actual_bytes == full, 60
        )


async def test_stats_period_is_set_live(booted: BootedDomain, source: LibvirtSource) -> None:
    uuid = booted.spec.uuid
    facts = await source.domain_facts(uuid)
    assert facts.balloon is not None and facts.balloon.stats_period == 2
    await source.set_memory_stats_period(uuid, 5)
    try:
        facts = await source.domain_facts(uuid)
        assert facts.balloon is not None and facts.balloon.stats_period == 5
    finally:
        await source.set_memory_stats_period(uuid, 2)
    facts = await source.domain_facts(uuid)
    assert facts.balloon is not None and facts.balloon.stats_period == 2


# -- the domain XML ------------------------------------------------------------------------------


async def test_domain_facts_of_the_live_domain(
    booted: BootedDomain, source: LibvirtSource, libvirtd: PrivateLibvirtd
) -> None:
    uuid, name = booted.spec.uuid, booted.spec.name
    ref = await running_ref(source, uuid)
    facts = await source.domain_facts(uuid)
    assert (facts.uuid, facts.name, facts.id, facts.domain_type) == (uuid, name, ref.id, "qemu")
    assert facts.memory_bytes == booted.spec.ram_mib * MiB
    assert facts.balloon is not None
    assert facts.balloon.model == "virtio" and facts.balloon.free_page_reporting is True
    assert facts.agent_channel  # the test guest runs qemu-ga on it (connected once it started)
    assert facts.problems == ()

    nova = f"{NOVA_NS_PREFIX}1.1"
    instance = (
        "<instance><name>web-1</name><flavor name='m1.small'/>"
        "<owner><user uuid='u-1'>alice</user><project uuid='p-1'>shop</project></owner>"
        "</instance>"
    )
    async with EventTap(source) as tap:
        libvirtd.virsh("metadata", name, nova, "--key", "nova", "--live", "--set", instance)
        await tap.wait_for(MetadataChanged, lambda e: e.domain.uuid == uuid and e.namespace == nova)
        libvirtd.virsh(
            "metadata", name, RECLAIMD_NS, "--key", "reclaimd", "--live", "--set",
            '<vm><reclaim enabled="no"/><minimum unit="MiB">96</minimum></vm>',
        )  # fmt: skip
        await tap.wait_for(
            MetadataChanged, lambda e: e.domain.uuid == uuid and e.namespace == RECLAIMD_NS
        )
    facts = await source.domain_facts(uuid)
    assert facts.nova is not None
    assert facts.nova.labels() == {
        "instance_name": "web-1",
        "flavor": "m1.small",
        "project_name": "shop",
        "project_uuid": "p-1",
        "user_name": "alice",
        "user_uuid": "u-1",
    }
    assert facts.options.present and not facts.options.reclaim
    assert facts.options.minimum_bytes == 96 * MiB
    # The persistent definition did not change (--live only).
    assert (await source.domain_facts(uuid, inactive=True)).nova is None


async def test_the_guest_agent_answers_and_its_errors_say_why(
    booted: BootedDomain,
    source: LibvirtSource,
    libvirtd: PrivateLibvirtd,
    libvirt_guest_image: GuestImage,
) -> None:
    # The test guest runs the real qemu-ga on its channel: the command goes through libvirt.
    deadline = time.monotonic() + 60
    while True:
        try:
            assert await source.agent_command(booted.spec.uuid, "guest-ping", timeout=2) == {}
            break
        except AgentUnavailable:  # the guest is still starting its agent
            assert time.monotonic() < deadline, "the guest's agent never answered through libvirt"
            await asyncio.sleep(1)
    # No channel at all (libvirt asks that the domain run, not only exist).
    spec = DomainSpec(name="rd-noagent", ram_mib=64)
    domains.define(spec, libvirtd)
    try:
        domains.start(spec, libvirtd)
        with pytest.raises(AgentUnavailable, match="not configured"):
            await source.agent_command(spec.uuid, "guest-ping", timeout=2)
    finally:
        libvirtd.virsh("destroy", spec.name, check=False)
        libvirtd.virsh("undefine", spec.name, check=False)


# -- libvirtd restarts ---------------------------------------------------------------------------


async def test_a_killed_and_restarted_libvirtd_is_reconnected_and_events_flow_again(
    booted: BootedDomain, source: LibvirtSource, libvirtd: PrivateLibvirtd
) -> None:
    uuid = booted.spec.uuid
    ref = await running_ref(source, uuid)
    pid = await source.qemu_pid(ref)
    async with EventTap(source) as tap:
        libvirtd.kill_libvirtd()
        try:
            await tap.wait_for(ConnectionLost, timeout=30)
            with pytest.raises(NotConnected):
                await source.memory_stats(uuid)
            # The VM runs on without libvirtd, and the host view still finds it.
            assert await source.qemu_pid(ref) == pid
        finally:
            libvirtd.spawn_libvirtd()
        await asyncio.to_thread(libvirtd.wait_answering)
        answering = time.monotonic()
        # The backoff is capped at 1 s here: reconnecting must not take long once libvirtd
        # answers. 10 s is the bound, with room for a loaded machine.
        back = await tap.wait_for(Reconnected, timeout=10)
        assert time.monotonic() - answering < 10
        assert uuid in {d.uuid for d in back.domains}
        assert back.outage > 0

        target = 208 * MiB
        await source.set_balloon_target(uuid, target)
        try:
            await tap.wait_for(
                BalloonChanged, lambda e: e.domain.uuid == uuid and e.actual_bytes == target, 60
            )
        finally:
            await source.set_balloon_target(uuid, booted.spec.ram_mib * MiB)
    assert source.reconnects == 1


async def test_a_hung_libvirtd_is_detected_by_keepalive(libvirtd: PrivateLibvirtd) -> None:
    pid = libvirtd.libvirtd_pid
    assert pid is not None
    async with LibvirtSource(
        libvirtd.uri,
        state_dir=libvirtd.qemu_state_dir,
        keepalive_interval=1,
        keepalive_count=2,
        call_timeout=2,
        connect_timeout=2,
        backoff_max=0.5,
    ) as src:
        await src.wait_connected(30)
        async with EventTap(src) as tap:
            os.kill(pid, signal.SIGSTOP)  # alive but not answering
            try:
                lost = await tap.wait_for(ConnectionLost, timeout=30)
                assert "keepalive" in lost.reason
                with pytest.raises(NotConnected):
                    await src.list_running()
                # Reconnecting now opens a socket nobody reads: those attempts time out.
                await asyncio.sleep(3.5)
                assert "open: no answer within 2 s" in (src.last_error or ""), src.last_error
                assert src.transitions[-1] in (SourceState.BACKOFF, SourceState.CONNECTING)
            finally:
                os.kill(pid, signal.SIGCONT)
            await tap.wait_for(Reconnected, timeout=30)
        assert src.reconnects == 1 and src.connected


# -- scale -----------------------------------------------------------------------------------------


async def test_many_paused_domains(
    source: LibvirtSource, libvirtd: PrivateLibvirtd, libvirt_guest_image: GuestImage
) -> None:
    specs = [DomainSpec(name=f"rd-paused-{i}", ram_mib=64, stats_period=None) for i in range(8)]
    try:
        async with EventTap(source) as tap:
            for spec in specs:
                domains.define(spec, libvirtd)
                domains.start(spec, libvirtd, paused=True)
            for spec in specs:
                await tap.wait_for(LifecycleChanged, lifecycle(spec.uuid, Lifecycle.STARTED))
        running = {r.uuid: r for r in await source.list_running()}
        assert {s.uuid for s in specs} <= set(running)
        assert len({running[s.uuid].id for s in specs}) == len(specs)
        for spec in specs:
            ref = running[spec.uuid]
            stats = await source.memory_stats(spec.uuid, ram_bytes=64 * MiB)
            # Paused from the start: the balloon is there, the guest never sent stats.
            assert stats.balloon_actual_bytes == 64 * MiB
            assert not stats.guest.available and stats.guest.valid
            pid = await source.qemu_pid(ref)
            assert pid is not None
            assert pid == int((libvirtd.qemu_state_dir / f"{spec.name}.pid").read_text())
            facts = await source.domain_facts(spec.uuid)
            assert facts.balloon is not None and facts.balloon.stats_period in (None, 0)
    finally:
        for spec in specs:
            libvirtd.virsh("destroy", spec.name, check=False)
            libvirtd.virsh("undefine", spec.name, check=False)
