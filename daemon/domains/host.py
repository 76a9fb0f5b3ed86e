"""Every domain of one libvirt URI as a VM of the fleet, following libvirt's events.

:class:`LibvirtHost` consumes a ``LibvirtSource``'s events and keeps one
:class:`~daemon.domains.session.LibvirtSession` per domain (by UUID), made and dropped through
the daemon's callbacks (``appeared``, ``vanished``):

- a running domain (in the snapshot at connect, or STARTED, including an incoming migration)
  gets a session, or its session attaches again;
- every defined domain that does not run has a VM too, down until it starts: those in the
  snapshot at connect (defined before reclaimd started) as those DEFINED while it runs;
- a stopped domain (STOPPED: destroyed, shut down, crashed, failed) stays, down, with its
  history, while it is defined; one that is gone (UNDEFINED while stopped, a transient domain
  that stopped, one migrated away) is dropped;
- libvirtd lost: every session goes down with the cause but keeps its VM, its poll cycle and
  its history (the QEMU processes do not depend on libvirtd); back: the new snapshot says which
  domains run, and each attaches again at once; domains defined meanwhile appear, and those
  undefined meanwhile go;
- events dropped because the host fell behind: the domains are listed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from daemon import libvirt as lv
from daemon.domains.monitor import labels_of, options_of
from daemon.domains.session import LibvirtSession

log = logging.getLogger(__name__)

#: Called for a domain that has no VM yet, with whether it runs; returns its (started) session.
Appeared = Callable[[lv.DomainRef, bool], LibvirtSession]
#: Called with the VM's name when its domain is gone.
Vanished = Callable[[str], None]

_EVENT_NAMES = {
    lv.Rebooted: "RESET",
    lv.AgentStateChanged: "AGENT_LIFECYCLE",
    lv.MemoryDeviceSizeChanged: "MEMORY_DEVICE_SIZE_CHANGE",
    lv.MemoryFailure: "MEMORY_FAILURE",
    lv.MetadataChanged: "METADATA_CHANGE",
    lv.DeviceAdded: "DEVICE_ADDED",
    lv.DeviceRemoved: "DEVICE_REMOVED",
}


class LibvirtHost:
    """The domains of ``source`` (see the module docstring)."""

    def __init__(self, source: lv.LibvirtSource, *, appeared: Appeared, vanished: Vanished) -> None:
        self.source = source
        self.appeared = appeared
        self.vanished = vanished
        self.sessions: dict[str, LibvirtSession] = {}  # by UUID
        self._checks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Follow the source's events until cancelled."""
        try:
            async for event in self.source.events():
                try:
                    await self.apply(event)
                except lv.LibvirtSourceError as exc:
                    log.warning("libvirt %s: %s", self.source.uri, exc)
        finally:
            for task in self._checks:
                task.cancel()

    async def apply(self, event: lv.SourceEvent) -> None:
        if isinstance(event, lv.Connected | lv.Reconnected):
            self.sync(event.domains, event.defined)
        elif isinstance(event, lv.ConnectionLost):
            log.warning("libvirt %s: connection lost: %s", event.uri, event.reason)
            for session in self.sessions.values():
                session.source_changed()
        elif isinstance(event, lv.EventsDropped):
            self.sync(*await self.source.list_domains())
        elif isinstance(event, lv.LifecycleChanged):
            self._lifecycle(event)
        elif isinstance(event, lv.BalloonChanged):
            changed = self.sessions.get(event.domain.uuid)
            if changed is not None:
                changed.event("BALLOON_CHANGE", {"actual": event.actual_bytes})
                changed.balloon_changed(event.actual_bytes)
        elif isinstance(event, lv.DomainEvent):
            other = self.sessions.get(event.domain.uuid)
            name = _EVENT_NAMES.get(type(event))
            if other is not None and name is not None:
                other.event(name, {})
            if other is not None and isinstance(event, lv.MetadataChanged):
                await self._metadata_changed(other, event)

    async def _metadata_changed(self, session: LibvirtSession, event: lv.MetadataChanged) -> None:
        """reclaimd's options (an opt-out, a minimum) or Nova's labels (an instance renamed,
        resized to another flavor), changed on the domain: they apply at once."""
        namespace = event.namespace or ""
        nova = session.settings.libvirt_nova_metadata
        if namespace == lv.RECLAIMD_NS or (nova and namespace.startswith(lv.NOVA_NS_PREFIX)):
            facts = await self.source.domain_facts(event.domain.uuid)
            session.vm.options = options_of(facts)
            session.vm.labels = labels_of(facts, nova=nova)

    def sync(self, running: Iterable[lv.DomainRef], defined: Iterable[lv.DomainRef] = ()) -> None:
        """Make the sessions agree with the domains that run now and those defined that do
        not run."""
        now = {d.uuid: d for d in running}
        down = {d.uuid: d for d in defined if d.uuid not in now}
        for domain in now.values():
            self._started(domain)
        for uuid, domain in down.items():
            if uuid not in self.sessions:
                self.sessions[uuid] = self.appeared(domain, False)
        for uuid, session in list(self.sessions.items()):
            if uuid in now:
                continue
            if session.active:
                session.domain_stopped("stopped while libvirtd was not connected")
            if uuid not in down:
                self._check_defined(uuid)  # a transient domain, or one undefined meanwhile

    def _started(self, domain: lv.DomainRef) -> None:
        session = self.sessions.get(domain.uuid)
        if session is None:
            self.sessions[domain.uuid] = self.appeared(domain, True)
        else:
            session.domain_started(domain)

    def _lifecycle(self, event: lv.LifecycleChanged) -> None:
        domain, kind = event.domain, event.event
        session = self.sessions.get(domain.uuid)
        if session is not None:
            session.event(f"LIFECYCLE_{kind.name}", {"detail": event.detail})
        if kind == lv.Lifecycle.STARTED:
            self._started(domain)
            if session is None:
                started = self.sessions[domain.uuid]
                started.event(f"LIFECYCLE_{kind.name}", {"detail": event.detail})
        elif kind == lv.Lifecycle.STOPPED and session is not None:
            session.domain_stopped(f"stopped ({event.detail})")
            if event.migrated:
                self._drop(domain.uuid)  # it runs on another host now
            else:
                self._check_defined(domain.uuid)
        elif kind == lv.Lifecycle.DEFINED and session is None:
            self.sessions[domain.uuid] = self.appeared(domain, False)
        elif kind == lv.Lifecycle.UNDEFINED and session is not None and not session.active:
            self._drop(domain.uuid)
        # UNDEFINED while running: the domain is transient now; it goes when it stops.

    def _check_defined(self, uuid: str) -> None:
        """Drop the domain's VM if it no longer exists (a transient domain that stopped)."""

        async def check() -> None:
            try:
                await self.source.domain_xml(uuid, inactive=True)
            except lv.DomainNotFound:
                session = self.sessions.get(uuid)
                if session is not None and not session.active:
                    self._drop(uuid)
            except lv.LibvirtSourceError as exc:
                log.info("libvirt: cannot tell whether %s is still defined: %s", uuid, exc)

        task = asyncio.get_running_loop().create_task(check(), name=f"libvirt-defined-{uuid}")
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _drop(self, uuid: str) -> None:
        session = self.sessions.pop(uuid, None)
        if session is not None:
            self.vanished(session.vm.name)
