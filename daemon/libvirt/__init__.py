"""The libvirt source: every domain of a libvirt URI, with no change to the domains.

Through libvirt's API only (``libvirt-python``, the optional extra ``reclaimd[libvirt]``):
domain events (lifecycle, balloon change...), ``memoryStats()``, the balloon target, the
domain XML's memory facts, the guest agent, and QEMU's pid for the host view; and QMP through
libvirt (``monitor_command``), which taints the domain, for those who turn it on.

- ``connection``: :class:`LibvirtSource`, the supervised connection (events and calls)
- ``events``: the typed events it yields
- ``errors``: the error tree
- ``domxml``: the domain XML's memory facts, Nova labels and reclaimd's per-VM options
- ``stats``: ``memoryStats()`` -> ``daemon.guest_stats.GuestStats``
- ``pid``: the QEMU pid of a domain
- ``eventloop``: libvirt's event loop thread
"""

try:
    import libvirt as _libvirt  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "reclaimd's libvirt source needs the libvirt Python binding: "
        "pip install 'reclaimd[libvirt]' (it builds against the system's libvirt: "
        "install libvirt-dev, pkg-config and gcc first, e.g. apt-get install libvirt-dev "
        "pkg-config gcc)"
    ) from exc

from daemon.libvirt.connection import (
    DEFAULT_URI,
    CallObserver,
    DomainInfo,
    LibvirtSource,
    SourceState,
)
from daemon.libvirt.domxml import (
    NOVA_NS_PREFIX,
    RECLAIMD_NS,
    Balloon,
    DomainFacts,
    DomainXMLError,
    HugePages,
    MemoryBacking,
    MemoryDevice,
    NovaInstance,
    ReclaimdOptions,
    parse_domain_xml,
)
from daemon.libvirt.errors import (
    AgentCommandFailed,
    AgentUnavailable,
    BadReply,
    CallFailed,
    CallTimeout,
    DomainNotFound,
    DomainNotRunning,
    LibvirtSourceError,
    MonitorCommandFailed,
    NotConnected,
    PermissionDenied,
    Unsupported,
)
from daemon.libvirt.events import (
    AgentStateChanged,
    BalloonChanged,
    Connected,
    ConnectionEvent,
    ConnectionLost,
    DeviceAdded,
    DeviceRemoved,
    DomainEvent,
    DomainRef,
    EventsDropped,
    Lifecycle,
    LifecycleChanged,
    MemoryDeviceSizeChanged,
    MemoryFailure,
    MetadataChanged,
    Rebooted,
    Reconnected,
    SourceEvent,
)
from daemon.libvirt.pid import find_qemu_pid
from daemon.libvirt.stats import LibvirtMemoryStats, parse_memory_stats

__all__ = [
    "DEFAULT_URI",
    "NOVA_NS_PREFIX",
    "RECLAIMD_NS",
    "AgentCommandFailed",
    "AgentStateChanged",
    "AgentUnavailable",
    "BadReply",
    "Balloon",
    "BalloonChanged",
    "CallFailed",
    "CallObserver",
    "CallTimeout",
    "Connected",
    "ConnectionEvent",
    "ConnectionLost",
    "DeviceAdded",
    "DeviceRemoved",
    "DomainEvent",
    "DomainFacts",
    "DomainInfo",
    "DomainNotFound",
    "DomainNotRunning",
    "DomainRef",
    "DomainXMLError",
    "EventsDropped",
    "HugePages",
    "LibvirtMemoryStats",
    "LibvirtSource",
    "LibvirtSourceError",
    "Lifecycle",
    "LifecycleChanged",
    "MemoryBacking",
    "MemoryDevice",
    "MemoryDeviceSizeChanged",
    "MemoryFailure",
    "MetadataChanged",
    "MonitorCommandFailed",
    "NotConnected",
    "NovaInstance",
    "PermissionDenied",
    "Rebooted",
    "ReclaimdOptions",
    "Reconnected",
    "SourceEvent",
    "SourceState",
    "Unsupported",
    "find_qemu_pid",
    "parse_domain_xml",
    "parse_memory_stats",
]
