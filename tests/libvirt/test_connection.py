"""LibvirtSource on libvirt's own in-process test driver (``test:///default``): the real library,
its events and its errors, with no daemon. (The e2e tests run it against a real libvirtd.)

``test:///default`` is one shared state per process: each test defines its own domains and
removes them.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest

from daemon.libvirt import (
    CallFailed,
    Connected,
    DomainNotFound,
    DomainNotRunning,
    DomainRef,
    EventsDropped,
    LibvirtSource,
    Lifecycle,
    LifecycleChanged,
    NotConnected,
    SourceState,
    Unsupported,
)
from tests.libvirt.tap import EventTap

TEST_URI = "test:///default"
MiB = 1 << 20


def domain_xml(name: str, uuid: str) -> str:
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
        "<memory unit='MiB'>128</memory><os><type>hvm</type></os></domain>"
    )


@pytest.fixture
async def source() -> AsyncIterator[LibvirtSource]:
    async with LibvirtSource(TEST_URI, state_dir=None) as src:
        await src.wait_connected(10)
        yield src


async def test_connects_and_reports_the_running_domains() -> None:
    src = LibvirtSource(TEST_URI, state_dir=None)
    async with src, EventTap(src) as tap:
        first = await tap.wait_for(Connected)
        assert first.uri == TEST_URI
        assert [d.name for d in first.domains] == ["test"]  # the driver's built-in domain
        assert first.domains == await src.list_running()
        assert first.domains[0].id is not None
    assert list(src.transitions) == [
        SourceState.IDLE,
        SourceState.CONNECTING,
        SourceState.CONNECTED,
        SourceState.CLOSED,
    ]
    # A closed source's events end; its calls say why.
    assert [e async for e in src.events()] == []
    with pytest.raises(NotConnected):
        await src.list_running()


async def test_lifecycle_events_of_changes_made_elsewhere(
    source: LibvirtSource, admin: libvirt.virConnect
) -> None:
    uuid = str(uuidlib.uuid4())
    async with EventTap(source) as tap:
        dom = await asyncio.to_thread(admin.defineXML, domain_xml("t-life", uuid))
        await asyncio.to_thread(dom.create)
        await asyncio.to_thread(dom.destroy)
        await asyncio.to_thread(dom.undefine)
        seen = []
        for _ in range(4):
            event = await tap.wait_for(LifecycleChanged, lambda e: e.domain.uuid == uuid)
            seen.append((event.event, event.detail))
    assert seen == [
        (Lifecycle.DEFINED, "added"),
        (Lifecycle.STARTED, "booted"),
        (Lifecycle.STOPPED, "destroyed"),
        (Lifecycle.UNDEFINED, "removed"),
    ]


async def test_libvirt_errors_are_mapped_with_their_cause(
    source: LibvirtSource, admin: libvirt.virConnect
) -> None:
    with pytest.raises(DomainNotFound) as missing:
        await source.info(str(uuidlib.uuid4()))
    assert isinstance(missing.value.__cause__, libvirt.libvirtError)
    assert missing.value.code == libvirt.VIR_ERR_NO_DOMAIN

    uuid = str(uuidlib.uuid4())
    dom = await asyncio.to_thread(admin.defineXML, domain_xml("t-inactive", uuid))
    try:
        with pytest.raises(DomainNotRunning):
            await source.memory_stats(uuid)
        assert (await source.info(uuid)).state == "shutoff"
        # The test driver has no guest agent; the error says it is unsupported.
        with pytest.raises(Unsupported):
            await source.agent_command(uuid, "guest-ping")
    finally:
        await asyncio.to_thread(dom.undefine)


async def test_balloon_target_info_and_stats(
    source: LibvirtSource, admin: libvirt.virConnect
) -> None:
    uuid = str(uuidlib.uuid4())
    dom = await asyncio.to_thread(admin.defineXML, domain_xml("t-balloon", uuid))
    await asyncio.to_thread(dom.create)
    try:
        info = await source.info(uuid)
        assert (info.state, info.max_memory_bytes, info.memory_bytes) == (
            "running",
            128 * MiB,
            128 * MiB,
        )
        await source.set_balloon_target(uuid, 96 * MiB + 100)  # rounded down to whole KiB
        assert (await source.info(uuid)).memory_bytes == 96 * MiB
        facts = await source.domain_facts(uuid)
        assert facts.current_memory_bytes == 96 * MiB and facts.name == "t-balloon"
    finally:
        await asyncio.to_thread(dom.destroy)
        await asyncio.to_thread(dom.undefine)


async def test_arguments_out_of_range_are_refused(source: LibvirtSource) -> None:
    ref = (await source.list_running())[0]
    with pytest.raises(ValueError):
        await source.set_balloon_target(ref.uuid, 0)
    with pytest.raises(ValueError):
        await source.set_memory_stats_period(ref.uuid, -1)
    with pytest.raises(ValueError):
        await source.agent_command(ref.uuid, "guest-ping", timeout=0)


async def test_the_call_observer_sees_each_call_and_its_outcome() -> None:
    calls: list[tuple[str, str]] = []
    async with LibvirtSource(
        TEST_URI, state_dir=None, on_call=lambda name, _s, outcome: calls.append((name, outcome))
    ) as src:
        await src.wait_connected(10)
        await src.list_running()
        with pytest.raises(CallFailed):
            await src.info(str(uuidlib.uuid4()))
    assert calls[:2] == [("open", "ok"), ("register events", "ok")]
    assert ("list domains", "ok") in calls
    assert ("domain info", "DomainNotFound") in calls
    assert calls[-1] == ("close", "ok")


async def test_an_unreachable_libvirtd_is_retried_and_wait_connected_says_why(
    tmp_path: object,
) -> None:
    uri = "qemu+unix:///system?socket=/nonexistent/reclaimd-test/libvirt-sock"
    async with LibvirtSource(uri, backoff_initial=0.01, backoff_max=0.05) as src:
        with pytest.raises(NotConnected, match="Failed to connect socket"):
            await src.wait_connected(0.5)
        with pytest.raises(NotConnected):
            await src.list_running()
        attempts = list(src.transitions).count(SourceState.CONNECTING)
    assert attempts >= 2
    assert SourceState.BACKOFF in src.transitions
    assert SourceState.CONNECTED not in src.transitions


async def test_events_dropped_when_the_consumer_falls_behind(admin: libvirt.virConnect) -> None:
    async with LibvirtSource(TEST_URI, state_dir=None, max_events=3) as src:
        await src.wait_connected(10)
        uuids = [str(uuidlib.uuid4()) for _ in range(3)]
        for i, uuid in enumerate(uuids):
            dom = await asyncio.to_thread(admin.defineXML, domain_xml(f"t-drop{i}", uuid))
            await asyncio.to_thread(dom.undefine)
        async with asyncio.timeout(10):
            # Connected + 6 events through a queue of 3; the counter has no event to wait on.
            while src.events_dropped < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        events = src.events()
        dropped = await anext(events)
        assert isinstance(dropped, EventsDropped) and dropped.count == 4
        kept = [await anext(events) for _ in range(3)]
        await events.aclose()
    # The newest three are kept: the last domain's DEFINED/UNDEFINED and the one before.
    assert all(isinstance(e, LifecycleChanged) for e in kept)
    assert [e.domain.uuid for e in kept if isinstance(e, LifecycleChanged)][-2:] == [uuids[2]] * 2


async def test_one_consumer_at_a_time(source: LibvirtSource) -> None:
    first = source.events()
    await asyncio.wait_for(anext(first), 5)  # Connected
    with pytest.raises(RuntimeError, match="consumer"):
        await anext(source.events())
    await first.aclose()


async def test_events_during_the_snapshot_come_after_it(admin: libvirt.virConnect) -> None:
    uuid = str(uuidlib.uuid4())

    class DefinesWhileListing(LibvirtSource):
        # A domain appears while the snapshot is being taken (the listing runs in a worker
        # thread; the pause lets its DEFINED event reach the asyncio loop meanwhile).
        def _list_running(self, link: Any) -> tuple[DomainRef, ...]:
            admin.defineXML(domain_xml("t-during", uuid))
            time.sleep(0.3)
            return super()._list_running(link)

    try:
        async with DefinesWhileListing(TEST_URI, state_dir=None) as src:
            events = src.events()
            first = await asyncio.wait_for(anext(events), 10)
            second = await asyncio.wait_for(anext(events), 10)
            await events.aclose()
        assert isinstance(first, Connected)
        assert isinstance(second, LifecycleChanged) and second.domain.uuid == uuid
    finally:
        await asyncio.to_thread(admin.lookupByUUIDString(uuid).undefine)
