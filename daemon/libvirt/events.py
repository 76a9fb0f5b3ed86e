"""What a libvirt source yields: typed, immutable events.

Two kinds. The connection's own: ``Connected`` (the first time), ``ConnectionLost`` and
``Reconnected``; the two that (re)establish carry the running domains at that moment and the defined
ones that do not run, so a consumer can tell which VMs started, stopped, appeared or went while it
could not see, and keep the history of those that did not. And the domains' events, translated from
libvirt's callbacks (``VIR_DOMAIN_EVENT_ID_*``): lifecycle, balloon change, reboot, guest-agent
state, memory device size change, memory failure, metadata change, device added or removed.

Events that arrive while a snapshot is taken are delivered after it, so one that repeats what
the snapshot already shows (a domain it lists as running, then its STARTED) must be applied
idempotently. When the consumer falls behind, the oldest events are dropped and an
``EventsDropped`` comes before the next one: re-list the domains then.

Sizes are bytes (libvirt's KiB times 1024); times are the host's wall clock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import libvirt

__all__ = [
    "CALLBACKS",
    "AgentStateChanged",
    "BalloonChanged",
    "Connected",
    "ConnectionEvent",
    "ConnectionLost",
    "DeviceAdded",
    "DeviceRemoved",
    "DomainEvent",
    "DomainRef",
    "EventsDropped",
    "Lifecycle",
    "LifecycleChanged",
    "MemoryDeviceSizeChanged",
    "MemoryFailure",
    "MetadataChanged",
    "Rebooted",
    "Reconnected",
    "SourceEvent",
    "domain_ref",
    "lifecycle_detail",
]

KiB: Final = 1024


@dataclass(frozen=True, order=True)
class DomainRef:
    """A domain's identity: ``uuid`` is stable for the life of its definition, ``name`` can
    change (rename), ``id`` is the running instance's number (None when it is not running; a
    restart gives a new one)."""

    uuid: str
    name: str
    id: int | None = None


def domain_ref(dom: libvirt.virDomain) -> DomainRef:
    """The identity of a binding's domain object. Reads only what the object holds (no call to
    libvirtd), so it is safe on libvirt's event thread."""
    number = dom.ID()
    return DomainRef(uuid=dom.UUIDString(), name=dom.name(), id=number if number > 0 else None)


# -- the connection's events --------------------------------------------------------------------


@dataclass(frozen=True)
class SourceEvent:
    """Base of everything a source yields. ``received``: host wall clock, seconds."""

    received: float


@dataclass(frozen=True)
class ConnectionEvent(SourceEvent):
    uri: str


@dataclass(frozen=True)
class Connected(ConnectionEvent):
    """The first connection is up; ``domains`` were running at that moment, ``defined`` were
    defined (persistent) but not running."""

    domains: tuple[DomainRef, ...]
    defined: tuple[DomainRef, ...] = ()


@dataclass(frozen=True)
class ConnectionLost(ConnectionEvent):
    """The connection is gone (libvirtd stopped or restarted, keepalive timed out, a call found
    the connection dead). The domains themselves keep running; the source reconnects."""

    reason: str


@dataclass(frozen=True)
class Reconnected(ConnectionEvent):
    """Connected again after a loss; ``domains`` run now, ``defined`` are defined but do not
    run; ``outage`` seconds without a connection."""

    domains: tuple[DomainRef, ...]
    outage: float
    defined: tuple[DomainRef, ...] = ()


@dataclass(frozen=True)
class EventsDropped(SourceEvent):
    """``count`` events were dropped because the consumer fell behind."""

    count: int


# -- the domains' events ------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainEvent(SourceEvent):
    domain: DomainRef


class Lifecycle(enum.StrEnum):
    """``VIR_DOMAIN_EVENT_*`` of a lifecycle event. Migration shows as a detail ("migrated") of
    STARTED (incoming), SUSPENDED/RESUMED (during) and STOPPED (outgoing); a QEMU that died
    is STOPPED with detail "failed" (or "crashed"); CRASHED is a guest panic (pvpanic)."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"


def _lifecycle_tables() -> tuple[dict[int, Lifecycle], dict[Lifecycle, dict[int, str]]]:
    # The binding defines VIR_DOMAIN_EVENT_<EVENT> and VIR_DOMAIN_EVENT_<EVENT>_<DETAIL> for the
    # libvirt it was built against; reading them keeps up with details newer libvirt adds.
    names = vars(libvirt)
    kinds: dict[int, Lifecycle] = {}
    details: dict[Lifecycle, dict[int, str]] = {}
    for kind in Lifecycle:
        number = names.get(f"VIR_DOMAIN_EVENT_{kind.name}")
        if type(number) is not int:
            continue
        kinds[number] = kind
        prefix = f"VIR_DOMAIN_EVENT_{kind.name}_"
        details[kind] = {
            value: name.removeprefix(prefix).lower()
            for name, value in names.items()
            if name.startswith(prefix) and not name.endswith("_LAST") and type(value) is int
        }
    return kinds, details


_KINDS, _DETAILS = _lifecycle_tables()


def lifecycle_detail(kind: Lifecycle, detail: int) -> str:
    """libvirt's detail number as a name: ``booted``, ``migrated``, ``destroyed``, ``failed``..."""
    return _DETAILS.get(kind, {}).get(detail, f"unknown-{detail}")


@dataclass(frozen=True)
class LifecycleChanged(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_LIFECYCLE``; ``detail`` as :func:`lifecycle_detail` names it."""

    event: Lifecycle
    detail: str

    @classmethod
    def from_callback(
        cls, received: float, dom: libvirt.virDomain, event: object, detail: object
    ) -> LifecycleChanged | None:
        """None for an event number this version does not know."""
        kind = _KINDS.get(event) if type(event) is int else None
        if kind is None:
            return None
        number = detail if type(detail) is int else -1
        return cls(received, domain_ref(dom), kind, lifecycle_detail(kind, number))

    @property
    def migrated(self) -> bool:
        return self.detail == "migrated"


@dataclass(frozen=True)
class BalloonChanged(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE``: the balloon's actual size, as QEMU's
    BALLOON_CHANGE (which QEMU rate-limits to one a second per VM)."""

    actual_bytes: int


@dataclass(frozen=True)
class Rebooted(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_REBOOT``: the guest reset (QEMU's RESET). The guest's counters
    (faults, swap) restart from zero."""


@dataclass(frozen=True)
class AgentStateChanged(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE``: the guest agent connected or disconnected."""

    connected: bool
    reason: str


@dataclass(frozen=True)
class MemoryDeviceSizeChanged(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_MEMORY_DEVICE_SIZE_CHANGE``: a virtio-mem device's plugged size."""

    alias: str
    size_bytes: int


@dataclass(frozen=True)
class MemoryFailure(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_MEMORY_FAILURE`` (QEMU's MEMORY_FAILURE)."""

    recipient: str
    action: str
    flags: int


@dataclass(frozen=True)
class MetadataChanged(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_METADATA_CHANGE``: ``kind`` is title, description or element;
    ``namespace`` the element's namespace URI (re-read the XML for Nova or reclaimd options)."""

    kind: str
    namespace: str | None


@dataclass(frozen=True)
class DeviceAdded(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_DEVICE_ADDED``: e.g. a DIMM plugged; re-read the memory layout."""

    alias: str


@dataclass(frozen=True)
class DeviceRemoved(DomainEvent):
    """``VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED``."""

    alias: str


def enum_name(prefix: str, value: object) -> str:
    """The lower-case suffix of the binding's constant ``<prefix><NAME>`` equal to ``value``."""
    for name, number in vars(libvirt).items():
        matches = name.startswith(prefix) and not name.endswith("_LAST")
        if matches and type(number) is int and number == value:
            return name.removeprefix(prefix).lower()
    return f"unknown-{str(value)[:20]}"


# -- from libvirt's callbacks -------------------------------------------------------------------

MAX_ALIAS: Final = 128

#: Builds the event from a callback's arguments: receive time, the domain object, then what
#: libvirt passes after the domain (without the opaque); None to ignore the call.
Builder = Callable[..., DomainEvent | None]


def _size(kib: object) -> int | None:
    return kib * KiB if type(kib) is int and 0 <= kib < 2**53 else None


def _alias(raw: object) -> str | None:
    return raw[:MAX_ALIAS] if isinstance(raw, str) and raw else None


def _balloon(t: float, dom: libvirt.virDomain, actual: object) -> BalloonChanged | None:
    size = _size(actual)
    return BalloonChanged(t, domain_ref(dom), size) if size is not None else None


def _agent(t: float, dom: libvirt.virDomain, state: object, reason: object) -> AgentStateChanged:
    connected = state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
    reason_name = enum_name("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_", reason)
    return AgentStateChanged(t, domain_ref(dom), connected, reason_name)


def _device_size(
    t: float, dom: libvirt.virDomain, alias: object, kib: object
) -> MemoryDeviceSizeChanged | None:
    name, size = _alias(alias), _size(kib)
    if name is None or size is None:
        return None
    return MemoryDeviceSizeChanged(t, domain_ref(dom), name, size)


def _memory_failure(
    t: float, dom: libvirt.virDomain, recipient: object, action: object, flags: object
) -> MemoryFailure:
    return MemoryFailure(
        t,
        domain_ref(dom),
        enum_name("VIR_DOMAIN_EVENT_MEMORY_FAILURE_RECIPIENT_", recipient),
        enum_name("VIR_DOMAIN_EVENT_MEMORY_FAILURE_ACTION_", action),
        flags if type(flags) is int else 0,
    )


def _metadata(t: float, dom: libvirt.virDomain, kind: object, uri: object) -> MetadataChanged:
    namespace = uri[:512] if isinstance(uri, str) and uri else None
    return MetadataChanged(t, domain_ref(dom), enum_name("VIR_DOMAIN_METADATA_", kind), namespace)


def _device(cls: type[DeviceAdded] | type[DeviceRemoved]) -> Builder:
    def build(t: float, dom: libvirt.virDomain, alias: object) -> DomainEvent | None:
        name = _alias(alias)
        return cls(t, domain_ref(dom), name) if name is not None else None

    return build


#: ``VIR_DOMAIN_EVENT_ID_*`` name -> builder. A name the binding lacks (older libvirt) is
#: skipped; one the daemon refuses (older libvirtd) is skipped at registration.
CALLBACKS: Final[Mapping[str, Builder]] = {
    "VIR_DOMAIN_EVENT_ID_LIFECYCLE": LifecycleChanged.from_callback,
    "VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE": _balloon,
    "VIR_DOMAIN_EVENT_ID_REBOOT": lambda t, dom: Rebooted(t, domain_ref(dom)),
    "VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE": _agent,
    "VIR_DOMAIN_EVENT_ID_MEMORY_DEVICE_SIZE_CHANGE": _device_size,
    "VIR_DOMAIN_EVENT_ID_MEMORY_FAILURE": _memory_failure,
    "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE": _metadata,
    "VIR_DOMAIN_EVENT_ID_DEVICE_ADDED": _device(DeviceAdded),
    "VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED": _device(DeviceRemoved),
}
