"""``LibvirtHost`` against a scripted source: what libvirt's test driver cannot make (a
reconnect after domains came and went).

The sessions are real ``LibvirtSession`` objects (not run: the host only tells them what
changed); the source answers from a dict of defined domains.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import libvirt as lv
from daemon.config import Settings
from daemon.domains import LibvirtHost, LibvirtSession
from daemon.fleet import VMState
from daemon.journal import Journal


def xml(name: str, uuid: str, period: int | None) -> str:
    stats = f"<stats period='{period}'/>" if period is not None else ""
    return (
        f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>"
        "<memory unit='MiB'>256</memory>"
        f"<devices><memballoon model='virtio'>{stats}</memballoon></devices></domain>"
    )


class ScriptedSource:
    """What LibvirtHost calls on a LibvirtSource, answered from ``defined``."""

    uri = "qemu:///scripted"
    connected = True
    last_error = None

    def __init__(self) -> None:
        self.defined: dict[str, str] = {}  # uuid -> domain XML
        self.running: set[str] = set()

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
