"""``LibvirtHost`` and ``read_domain`` against a scripted source: the events libvirt's test
driver cannot make (migrations, a reconnect after domains came and went) and the stats period.

The sessions are real ``LibvirtSession`` objects (not run: the host only tells them what
changed); the source answers from a dict of defined domains.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon import libvirt as lv
from daemon.config import Settings
from daemon.domains import LibvirtHost, LibvirtSession, read_domain
from daemon.domains.monitor import LibvirtMonitor
from daemon.fleet import VMState
from daemon.guest_stats import GuestStats
from daemon.journal import Journal

MiB = 1 << 20


def xml(name: str, uuid: str, period: int | None) -> str:
    stats = f"<stats period='{period}'/>" if period is not None else ""
    return (
        f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>"
        "<memory unit='MiB'>256</memory>"
        f"<devices><memballoon model='virtio'>{stats}</memballoon></devices></domain>"
    )


class ScriptedSource:
    """What LibvirtHost and read_domain call on a LibvirtSource, answered from ``defined``."""

    uri = "qemu:///scripted"
    connected = True
    last_error = None

    def __init__(self) -> None:
        self.defined: dict[str, str] = {}  # uuid -> domain XML
        self.running: set[str] = set()
        self.periods: list[tuple[str, int]] = []

    def define(self, name: str, *, period: int | None = 2) -> lv.DomainRef:
        uuid = str(uuidlib.uuid4())
        self.defined[uuid] = xml(name, uuid, period)
        return lv.DomainRef(uuid, name)

    async def domain_xml(self, uuid: str, *, inactive: bool = False) -> str:
        if uuid not in self.defined:
            raise lv.DomainNotFound("domain XML", None, None, "no such domain")
        return self.defined[uuid]

    async def domain_facts(self, uuid: str, *, inactive: bool = False) -> lv.DomainFacts:
        return lv.parse_domain_xml(await self.domain_xml(uuid))

    async def qemu_pid(self, domain: lv.DomainRef) -> int | None:
        return None

    async def set_memory_stats_period(self, uuid: str, period: int) -> None:
        self.periods.append((uuid, period))


class Harness:
    def __init__(self, journal: Journal) -> None:
        self.source = ScriptedSource()
        self.journal = journal
        self.vanished: list[str] = []
        self.host = LibvirtHost(
            self.source,  # type: ignore[arg-type]
            appeared=self.appeared,
            vanished=self.vanished.append,
        )

    def appeared(self, domain: lv.DomainRef, active: bool) -> LibvirtSession:
        vm = VMState(domain.name, f"libvirt:{self.source.uri}", "libvirt")
        return LibvirtSession(
            vm,
            Settings(),
            self.journal,
            source=self.source,  # type: ignore[arg-type]
            domain=domain,
            active=active,
        )

    async def apply(self, event: lv.SourceEvent) -> None:
        await self.host.apply(event)
        await asyncio.sleep(0.01)  # the host's "still defined?" checks

    def session(self, domain: lv.DomainRef) -> LibvirtSession:
        return self.host.sessions[domain.uuid]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with Journal(tmp_path / "journal.sqlite3") as journal:
        yield Harness(journal)


def lifecycle(domain: lv.DomainRef, kind: lv.Lifecycle, detail: str) -> lv.LifecycleChanged:
    return lv.LifecycleChanged(time.time(), domain, kind, detail)


# -- migrations -----------------------------------------------------------------------------------


async def test_an_incoming_migration_attaches_and_an_outgoing_one_drops_the_vm(
    harness: Harness,
) -> None:
    await harness.apply(lv.Connected(time.time(), harness.source.uri, ()))
    assert harness.host.sessions == {}
    domain = harness.source.define("mig")  # the incoming migration defines it here

    # Migrated in: STARTED "migrated" makes a running VM at once.
    incoming = lv.DomainRef(domain.uuid, domain.name, id=7)
    await harness.apply(lifecycle(incoming, lv.Lifecycle.STARTED, "migrated"))
    session = harness.session(domain)
    assert session.active and session.domain == incoming
    assert session.vm.event_counts == {"LIFECYCLE_STARTED": 1}

    # Migrated away: STOPPED "migrated" drops it at once, although the domain is still
    # defined here (a persistent source keeps its definition): it runs on another host now.
    assert domain.uuid in harness.source.defined
    await harness.apply(lifecycle(incoming, lv.Lifecycle.STOPPED, "migrated"))
    assert not session.active and session.stopped_cause == "stopped (migrated)"
    assert session.vm.event_counts["LIFECYCLE_STOPPED"] == 1
    assert domain.uuid not in harness.host.sessions
    assert harness.vanished == ["mig"]


async def test_a_stop_that_is_no_migration_keeps_the_defined_vm(harness: Harness) -> None:
    domain = harness.source.define("kept")
    running = lv.DomainRef(domain.uuid, domain.name, id=3)
    await harness.apply(lv.Connected(time.time(), harness.source.uri, (running,)))
    await harness.apply(lifecycle(running, lv.Lifecycle.STOPPED, "destroyed"))
    session = harness.session(domain)
    assert not session.active and session.stopped_cause == "stopped (destroyed)"
    assert harness.vanished == []
    # Migrated back in later: the same VM record, running again with the new instance.
    back = lv.DomainRef(domain.uuid, domain.name, id=9)
    await harness.apply(lifecycle(back, lv.Lifecycle.STARTED, "migrated"))
    assert harness.session(domain) is session and session.active and session.domain == back


# -- snapshots: defined domains, and what changed while libvirtd was away -------------------------


async def test_defined_domains_are_listed_down_and_a_reconnect_brings_the_changes(
    harness: Harness,
) -> None:
    source = harness.source
    up, down, gone = source.define("up"), source.define("down"), source.define("gone")
    up_running = lv.DomainRef(up.uuid, up.name, id=1)
    await harness.apply(lv.Connected(time.time(), source.uri, (up_running,), (down, gone)))
    assert harness.session(up).active
    assert not harness.session(down).active and not harness.session(gone).active
    assert harness.session(down).vm.uuid == down.uuid  # known before any attach

    # While libvirtd was away: "up" stopped, "gone" was undefined, "new" was defined.
    await harness.apply(lv.ConnectionLost(time.time(), source.uri, "EOF"))
    del source.defined[gone.uuid]
    new = source.define("new")
    await harness.apply(
        lv.Reconnected(time.time(), source.uri, (), outage=1.0, defined=(up, down, new))
    )
    assert not harness.session(up).active
    assert harness.session(up).stopped_cause == "stopped while libvirtd was not connected"
    assert not harness.session(new).active
    assert set(harness.host.sessions) == {up.uuid, down.uuid, new.uuid}
    assert harness.vanished == ["gone"]


# -- the stats period at attach -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "stats_interval", "set_to"),
    [
        (0, 5, 5),  # 0 (off) and configured: set to the configured interval
        (None, 3, 3),  # no <stats> element: QEMU's default is off too
        (0, 0, None),  # stats_interval 0: the domain is left alone
        (2, 5, None),  # a period of its own is kept
    ],
)
async def test_the_stats_period_is_set_only_when_off_and_configured(
    period: int | None, stats_interval: int, set_to: int | None
) -> None:
    source = ScriptedSource()
    domain = source.define("d", period=period)
    vm = VMState("d", "libvirt:x", "libvirt")
    await read_domain(source, domain, vm, stats_interval=stats_interval)  # type: ignore[arg-type]
    if set_to is None:
        assert source.periods == []
        assert vm.balloon.stats_polling_interval == (period or 0)
    else:
        assert source.periods == [(domain.uuid, set_to)]
        assert vm.balloon.stats_polling_interval == set_to
    assert vm.memory.ram_bytes == 256 * MiB


class RacingSource:
    """Answers a poll with the balloon as it was when the call began, while a BALLOON_CHANGE
    comes in before the answer does (libvirt's events and replies travel apart)."""

    connected = True

    def __init__(self, vm: VMState, on_call: Callable[[], None]) -> None:
        self.vm, self.on_call = vm, on_call

    async def info(self, uuid: str) -> lv.DomainInfo:
        self.on_call()
        return lv.DomainInfo("running", 256 * MiB, 256 * MiB, 1, 0)

    async def memory_stats(self, uuid: str, *, ram_bytes: int | None, now: float) -> object:
        return lv.LibvirtMemoryStats(guest=GuestStats(valid=False), balloon_actual_bytes=256 * MiB)


async def test_a_balloon_change_during_a_poll_is_not_undone_by_its_older_answer() -> None:
    vm = VMState(name="vm1", address="libvirt:vm1", attach="libvirt")
    vm.memory.base_bytes = 256 * MiB
    vm.balloon.present = True
    vm.balloon.actual_bytes = 256 * MiB
    session = object.__new__(LibvirtSession)
    session.vm, session._wake = vm, asyncio.Event()

    def event_in_flight() -> None:  # the balloon reached 200 MiB while libvirtd answered
        LibvirtSession.balloon_changed(session, 200 * MiB)

    monitor = LibvirtMonitor(RacingSource(vm, event_in_flight), "u", vm)  # type: ignore[arg-type]
    await monitor.poll()
    assert vm.balloon.actual_bytes == 200 * MiB
    await monitor.read_balloon()
    assert vm.balloon.actual_bytes == 200 * MiB
    # With no event in flight, the poll's answer is the balloon's size.
    monitor.source = RacingSource(vm, lambda: None)  # type: ignore[assignment]
    await monitor.poll()
    assert vm.balloon.actual_bytes == 256 * MiB
