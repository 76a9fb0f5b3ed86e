"""``/metrics``: VM data built from the fleet at scrape time, plus the daemon's own instruments.

``FleetCollector.collect`` reads only the in-memory fleet: no I/O, no QMP, so a hung VM never
slows a scrape, and a VM that vanished from the fleet vanishes from the output. Names follow
Prometheus conventions: ``qemu_`` for VM data, ``reclaimd_`` for the daemon, base units,
``_total`` only on counters (prometheus-client appends it to counter families).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.version import VERSION
from daemon.fleet import Fleet, VMState
from daemon.instruments import REGISTRY as DAEMON_REGISTRY

# (metric, help, GuestStats field) for gauges and counters taken straight from guest stats.
_STAT_GAUGES = (
    ("qemu_guest_memory_total_bytes", "Guest total memory (MemTotal)", "total_bytes"),
    ("qemu_guest_memory_free_bytes", "Guest free memory (MemFree)", "free_bytes"),
    ("qemu_guest_memory_available_bytes", "Guest available memory", "available_bytes"),
    (
        "qemu_guest_disk_caches_bytes",
        "Guest page cache (NR_FILE_PAGES: includes shmem and tmpfs, which cannot be dropped)",
        "disk_caches_bytes",
    ),
)
_STAT_COUNTERS = (
    ("qemu_guest_swap_in_bytes", "Bytes the guest swapped in", "swap_in_bytes"),
    ("qemu_guest_swap_out_bytes", "Bytes the guest swapped out", "swap_out_bytes"),
    ("qemu_guest_major_faults", "Guest major page faults", "major_faults"),
    ("qemu_guest_minor_faults", "Guest minor page faults", "minor_faults"),
    ("qemu_guest_hugetlb_allocations", "Guest hugetlb page allocations", "hugetlb_allocations"),
    ("qemu_guest_hugetlb_failures", "Guest hugetlb allocation failures", "hugetlb_failures"),
    ("qemu_guest_oom_kills", "Guest OOM kills (QEMU 9.2+)", "oom_kills"),
    ("qemu_guest_alloc_stalls", "Guest allocation stalls (QEMU 9.2+)", "alloc_stalls"),
    ("qemu_guest_kswapd_scanned_bytes", "Bytes scanned by kswapd (QEMU 9.2+)", "async_scans"),
    (
        "qemu_guest_direct_scanned_bytes",
        "Bytes scanned by direct reclaim (QEMU 9.2+)",
        "direct_scans",
    ),
    (
        "qemu_guest_kswapd_reclaimed_bytes",
        "Bytes reclaimed by kswapd (QEMU 9.2+)",
        "async_reclaims",
    ),
    (
        "qemu_guest_direct_reclaimed_bytes",
        "Bytes reclaimed directly (QEMU 9.2+)",
        "direct_reclaims",
    ),
)
RECLAIM_COMPONENTS = (
    "ballooned",
    "reported",
    "free_resident",
    "reportable",
    "stranded",
    "cache",
    "reclaimable",
)


def _gauge(name: str, doc: str, labels: Iterable[str] = ("vm",)) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Iterable[str] = ("vm",)) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


class FleetCollector(Collector):
    """Builds every ``qemu_*`` family from a fleet snapshot on each scrape."""

    def __init__(self, fleet: Callable[[], Fleet], clock: Callable[[], float] = time.time) -> None:
        self._fleet = fleet
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        vms = list(self._fleet())
        up = _gauge("qemu_vm_up", "1 when reclaimd's QMP session to the VM is up")
        info = _gauge(
            "qemu_vm_info",
            "VM identity; always 1",
            ("vm", "uuid", "qemu_version", "attach"),
        )
        running = _gauge("qemu_vm_running", "1 when the guest CPUs run")
        memory = _gauge("qemu_vm_memory_bytes", "Guest RAM: base plus plugged memory")
        actual = _gauge("qemu_balloon_actual_bytes", "Memory the guest has now (RAM - balloon)")
        target = _gauge("qemu_balloon_target_bytes", "Balloon target set through reclaimd")
        fpr = _gauge(
            "qemu_balloon_free_page_reporting_enabled",
            "1 when the balloon device offers free page reporting",
        )
        doom = _gauge("qemu_balloon_deflate_on_oom_enabled", "1 when deflate-on-oom is on")
        stat_gauges: list[tuple[GaugeMetricFamily | CounterMetricFamily, str]] = [
            (_gauge(n, h), f) for n, h, f in _STAT_GAUGES
        ]
        stat_counters: list[tuple[GaugeMetricFamily | CounterMetricFamily, str]] = [
            (_counter(n, h), f) for n, h, f in _STAT_COUNTERS
        ]
        age = _gauge("qemu_guest_stats_age_seconds", "Seconds since the guest last updated stats")
        valid = _gauge(
            "qemu_guest_stats_valid", "1 when guest stats passed checks, 0 when rejected"
        )
        events = _counter(
            "qemu_events", "QMP events received from the VM, by event", ("vm", "event")
        )
        host = HostFamilies()

        for vm in vms:
            labels = [vm.name]
            up.add_metric(labels, 1.0 if vm.up else 0.0)
            info.add_metric([vm.name, vm.uuid or "", vm.qemu_version or "", vm.attach], 1.0)
            for event, count in sorted(vm.event_counts.items()):
                events.add_metric([vm.name, event], count)
            if vm.running is not None:
                running.add_metric(labels, 1.0 if vm.running else 0.0)
            if vm.memory.ram_bytes is not None:
                memory.add_metric(labels, vm.memory.ram_bytes)
            balloon = vm.balloon
            if balloon.actual_bytes is not None and balloon.present:
                actual.add_metric(labels, balloon.actual_bytes)
            if balloon.target_bytes is not None:
                target.add_metric(labels, balloon.target_bytes)
            if balloon.free_page_reporting is not None:
                fpr.add_metric(labels, 1.0 if balloon.free_page_reporting else 0.0)
            if balloon.deflate_on_oom is not None:
                doom.add_metric(labels, 1.0 if balloon.deflate_on_oom else 0.0)
            stats = vm.guest_stats
            if stats is not None and stats.available:
                valid.add_metric(labels, 1.0 if stats.valid else 0.0)
                stats_age = stats.age(now)
                if stats_age is not None:
                    age.add_metric(labels, stats_age)
                if stats.valid:
                    for family, field in (*stat_gauges, *stat_counters):
                        value = getattr(stats, field)
                        if value is not None:
                            family.add_metric(labels, value)
            host.add(vm)

        yield from (up, info, running, memory, actual, target, fpr, doom)
        yield from (family for family, _ in stat_gauges)
        yield from (family for family, _ in stat_counters)
        yield from (age, valid, events)
        yield from host.families()
        vm_count = _gauge("reclaimd_vms", "VMs known to reclaimd", ())
        vm_count.add_metric([], len(vms))
        yield vm_count


class HostFamilies:
    """Families from the host view, ledger and estimate (``VMState.host``, ``.estimate``)."""

    def __init__(self) -> None:
        self.resident = _gauge("qemu_host_resident_bytes", "Guest RAM the host still backs")
        self.reported = _gauge(
            "qemu_reported_bytes", "Guest RAM discarded by free page reporting, not refaulted"
        )
        self.reported_total = _counter(
            "qemu_reported_bytes", "Bytes discarded by free page reporting"
        )
        self.refaulted_total = _counter(
            "qemu_refaulted_bytes", "Bytes of discarded guest RAM touched again"
        )
        self.reclaimable = _gauge(
            "qemu_reclaimable_bytes",
            "The reclaim estimate by component (see the README for each)",
            ("vm", "component"),
        )
        self.effective = _gauge(
            "qemu_free_page_reporting_effective",
            "1 when reported pages are really discarded, 0 when negotiated but ineffective",
        )

    def add(self, vm: VMState) -> None:
        labels = [vm.name]
        host = vm.host
        if host is not None:
            if host.ledger is not None:
                self.resident.add_metric(labels, host.ledger.resident_bytes)
                self.reported.add_metric(labels, host.ledger.reported_bytes)
                self.reported_total.add_metric(labels, host.ledger.reported_bytes_total)
                self.refaulted_total.add_metric(labels, host.ledger.refaulted_bytes_total)
            if host.reporting_effective is not None:
                self.effective.add_metric(labels, 1.0 if host.reporting_effective else 0.0)
        if vm.estimate is not None:
            components = vm.estimate.components
            for component in RECLAIM_COMPONENTS:
                entry = components.get(component)
                if entry is not None and entry.bytes is not None:
                    self.reclaimable.add_metric([vm.name, component], entry.bytes)

    def families(self) -> Iterator[Metric]:
        yield from (
            self.resident,
            self.reported,
            self.reported_total,
            self.refaulted_total,
            self.reclaimable,
            self.effective,
        )


class _DaemonInstruments(Collector):
    """Re-exports the daemon's own counters and histograms, plus build info."""

    def collect(self) -> Iterator[Metric]:
        build = _gauge("reclaimd_build_info", "reclaimd build; always 1", ("version",))
        build.add_metric([VERSION], 1.0)
        yield build
        yield from DAEMON_REGISTRY.collect()


def build_registry(fleet: Callable[[], Fleet]) -> CollectorRegistry:
    """A registry holding exactly reclaimd's series (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    registry.register(_DaemonInstruments())
    return registry
