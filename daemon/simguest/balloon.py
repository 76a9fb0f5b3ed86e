"""The host side of virtio-balloon, as QEMU 7.2 keeps it (hw/virtio/virtio-balloon.c).

QEMU holds the target (``num_pages``), the inflation the guest last wrote to the config space
(``actual``), the last statistics the guest pushed and the stats polling timer. The guest side
(the driver that takes pages from the allocator) lives in ``daemon.simguest.guest``.

Guest statistics start as 2^64-1 ("unavailable") with ``last-update`` 0. Each push from the
guest replaces all of them and stamps ``last-update`` with the host's wall-clock second. The
polling timer runs on QEMU's virtual clock, which stops while the VM is paused; a newly enabled
timer fires at once, and each push re-arms it one interval later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from daemon.guest_stats import STATS, GuestStats, format_guest_stats
from daemon.simguest import qom
from daemon.simguest.events import EventBus
from daemon.simguest.schema import INT64_MAX, UINT64_MAX
from daemon.simguest.wire import QMPError, generic

VIRTIO_BALLOON_PFN_SHIFT = 12
UNAVAILABLE = UINT64_MAX
QEMU_VERSION = (7, 2)
# The statistics QEMU 7.2 knows, in the order of its ``balloon_stat_names``.
STAT_NAMES = tuple(s.qmp for s in STATS if s.since <= QEMU_VERSION)
PCI_TYPE = "virtio-balloon-pci"
DEVICE_TYPE = "virtio-balloon-device"


class BalloonDevice:
    """QEMU's virtio-balloon device state for one VM."""

    def __init__(
        self,
        ram_bytes: int,
        events: EventBus,
        *,
        free_page_reporting: bool = True,
        deflate_on_oom: bool = False,
        wall_clock: Callable[[], float],
    ) -> None:
        self.ram_bytes = ram_bytes
        self.free_page_reporting = free_page_reporting
        self.deflate_on_oom = deflate_on_oom
        self.free_page_hint = False
        self.page_poison = True
        self._events = events
        self._wall_clock = wall_clock
        self.num_pages = 0  # target inflation in 4 KiB pages, written by QMP ``balloon``
        self.actual_pages = 0  # inflation the guest driver last reported
        self.stats = GuestStats()  # what the guest pushed last; None: unavailable
        self.stats_last_update = 0
        self.poll_interval = 0
        self._next_poll: float | None = None  # virtual-clock time of the next stats request

    # QMP ``balloon`` and ``query-balloon`` (softmmu/balloon.c)

    def set_target(self, target_bytes: int) -> None:
        if target_bytes <= 0:
            raise generic("Parameter 'target' expects a size")
        target = min(target_bytes, self.ram_bytes)
        self.num_pages = (self.ram_bytes - target) >> VIRTIO_BALLOON_PFN_SHIFT

    def query(self) -> dict[str, int]:
        return {"actual": self.actual_bytes}

    @property
    def actual_bytes(self) -> int:
        return self.ram_bytes - (self.actual_pages << VIRTIO_BALLOON_PFN_SHIFT)

    @property
    def target_bytes(self) -> int:
        return self.ram_bytes - (self.num_pages << VIRTIO_BALLOON_PFN_SHIFT)

    # What the guest driver does to the device

    def guest_set_actual(self, pages: int) -> None:
        """The driver wrote ``actual`` to the config space; QEMU announces changes."""
        if pages != self.actual_pages:
            self.actual_pages = pages
            self._events.emit("BALLOON_CHANGE", {"actual": self.actual_bytes})

    def receive_stats(self, stats: GuestStats, now: float) -> None:
        """The driver pushed a stats buffer; ``now`` is the virtual clock. What the guest did
        not send reads as unavailable, and what this QEMU does not know is never shown."""
        self.stats = stats
        self.stats_last_update = int(self._wall_clock())
        self._next_poll = now + self.poll_interval if self.poll_interval > 0 else None

    @property
    def next_poll(self) -> float | None:
        """Virtual-clock time the polling timer fires next (None: not armed)."""
        return self._next_poll

    def stats_request_due(self, now: float) -> bool:
        """Whether the polling timer has fired by virtual time ``now``."""
        return self._next_poll is not None and now >= self._next_poll

    def no_driver(self, now: float) -> None:
        """No driver took the stats queue: a due timer only re-arms (``balloon_stats_poll_cb``)."""
        if self.stats_request_due(now):
            self._next_poll = now + self.poll_interval

    def stats_requested(self) -> None:
        """The guest took the request; the timer is re-armed when its answer arrives."""
        self._next_poll = None

    def set_poll_interval(self, value: Any, now: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > INT64_MAX:
            raise generic(
                "Invalid parameter type for 'guest-stats-polling-interval', expected: integer"
            )
        if value < 0:
            raise generic("timer value must be greater than zero")
        if value > 0xFFFFFFFF:
            raise generic("timer value is too big")
        if value == self.poll_interval:
            return
        enabled = self.poll_interval > 0
        self.poll_interval = value
        if value == 0:
            self._next_poll = None
        elif enabled:
            self._next_poll = now + value
        else:
            self._next_poll = now

    def guest_stats(self) -> dict[str, Any]:
        pushed = replace(self.stats, last_update=self.stats_last_update or None, unknown={})
        return format_guest_stats(pushed, since=QEMU_VERSION)

    # The QOM objects: the PCI proxy ``balloon0`` and its ``virtio-backend`` child

    def qom_objects(self, device_id: str, now: Callable[[], float]) -> qom.QOMObject:
        """The PCI proxy with its backend child; ``now`` reads the virtual clock."""
        base = f"/machine/peripheral/{device_id}"
        backend_only = [
            qom.read_only("parent_bus", "link<bus>", f"{base}/virtio-bus"),
            qom.static("realized", "bool", True, device=None, owner=DEVICE_TYPE),
            qom.static("hotplugged", "bool", False, device=None, owner=DEVICE_TYPE),
            qom.static("hotpluggable", "bool", False, device=None, owner=DEVICE_TYPE),
            qom.Prop("legacy-iothread", "str", owner=DEVICE_TYPE),
        ]
        backend = qom.QOMObject(
            DEVICE_TYPE, [*backend_only, *self._backend_props(DEVICE_TYPE, now)]
        )
        pci_props = [
            *(qom.static(n, t, v, device=device_id, owner=PCI_TYPE) for n, t, v in _PCI_PROPS),
            *self._backend_props(DEVICE_TYPE, now),
            *(qom.read_only(n, "child<memory-region>", f"{base}/{n}") for n in _PCI_REGIONS),
            qom.read_only("virtio-bus", "child<virtio-pci-bus>", f"{base}/virtio-bus"),
        ]
        pci = qom.QOMObject(PCI_TYPE, pci_props)
        pci.children["virtio-backend"] = backend
        return pci

    def _backend_props(self, owner: str, now: Callable[[], float]) -> list[qom.Prop]:
        def interval_set(value: Any) -> None:
            self.set_poll_interval(value, now())

        def feature(name: str, get: Callable[[], bool]) -> qom.Prop:
            prop = qom.static(name, "bool", None, device=None, owner=owner)
            prop.get = get
            return prop

        return [
            *(qom.static(n, t, v, device=None, owner=owner) for n, t, v in _VIRTIO_PROPS),
            feature("deflate-on-oom", lambda: self.deflate_on_oom),
            feature("free-page-hint", lambda: self.free_page_hint),
            feature("page-poison", lambda: self.page_poison),
            qom.static("qemu-4-0-config-size", "bool", False, device=None, owner=owner),
            feature("free-page-reporting", lambda: self.free_page_reporting),
            qom.Prop(
                "guest-stats-polling-interval",
                "int",
                get=lambda: self.poll_interval,
                set=interval_set,
                owner=owner,
            ),
            qom.Prop("guest-stats", "guest statistics", get=self.guest_stats, owner=owner),
        ]


def device_not_active() -> QMPError:
    return QMPError("DeviceNotActive", "No balloon device has been activated")


# Static properties of the PCI proxy and of every virtio device, with QEMU 7.2's defaults
# for ``-device virtio-balloon-pci,id=balloon0`` on a pc machine.
_PCI_PROPS: tuple[tuple[str, str, Any], ...] = (
    ("parent_bus", "link<bus>", "/machine/i440fx/pci.0"),
    ("realized", "bool", True),
    ("hotplugged", "bool", False),
    ("hotpluggable", "bool", True),
    ("failover_pair_id", "str", ""),
    ("romfile", "str", ""),
    ("addr", "int32", 16),
    ("romsize", "uint32", 4294967295),
    ("x-pcie-lnksta-dllla", "bool", True),
    ("rombar", "uint32", 1),
    ("x-pcie-extcap-init", "bool", True),
    ("acpi-index", "uint32", 0),
    ("multifunction", "bool", False),
    ("legacy-addr", "str", "02.0"),
    ("migrate-extra", "bool", True),
    ("ats", "bool", False),
    ("x-ignore-backend-features", "bool", False),
    ("x-pcie-pm-init", "bool", True),
    ("aer", "bool", False),
    ("x-pcie-flr-init", "bool", True),
    ("x-pcie-lnkctl-init", "bool", True),
    ("x-ats-page-aligned", "bool", True),
    ("page-per-vq", "bool", False),
    ("x-pcie-deverr-init", "bool", True),
    ("virtio-pci-bus-master-bug-migration", "bool", False),
    ("modern-pio-notify", "bool", False),
    ("x-disable-pcie", "bool", False),
    ("disable-legacy", "OnOffAuto", "off"),
    ("disable-modern", "bool", False),
)
_VIRTIO_PROPS: tuple[tuple[str, str, Any], ...] = (
    ("indirect_desc", "bool", True),
    ("event_idx", "bool", True),
    ("notify_on_empty", "bool", True),
    ("any_layout", "bool", True),
    ("iommu_platform", "bool", False),
    ("packed", "bool", False),
    ("queue_reset", "bool", True),
    ("use-started", "bool", True),
    ("use-disabled-flag", "bool", True),
    ("x-disable-legacy-check", "bool", False),
    ("iothread", "link<iothread>", ""),
)
_PCI_REGIONS = (
    "virtio-pci-device-virtio-balloon[0]",
    "bus master container[0]",
    "virtio-pci-notify-virtio-balloon[0]",
    "virtio-pci[1]",
    "virtio-pci-notify-pio-virtio-balloon[0]",
    "virtio-pci-common-virtio-balloon[0]",
    "virtio-pci[0]",
    "virtio-pci-isr-virtio-balloon[0]",
    "bus master[0]",
)
