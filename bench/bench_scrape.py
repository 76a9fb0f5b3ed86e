"""Event-loop time of a full /metrics scrape: prometheus_client families vs the text writer.

Builds a fleet of --count VMs shaped like real ones (every field that produces series: session,
identity, balloon, all sixteen guest stats, four event kinds, the host view's ledger and all
seven estimate components), then times the OLD path (``generate_latest`` of a registry holding
the collector reclaimd used before ``api.exposition``, kept below so the comparison stays fair)
and the NEW path (``api.metrics.exposition``), checks that both write the same bytes, and writes
the numbers and the machine to RESULTS-scrape.md beside this file (or --output).

    python bench/bench_scrape.py [--count 500] [--repeat 20] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import version
from pathlib import Path

from machine import cpu_model  # bench/machine.py: scripts run from bench/
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.metrics import FREE_RESIDENT_PARTS, RETURNED_PARTS, exposition
from api.version import VERSION
from daemon.fleet import Fleet, SessionState, VMState
from daemon.guest_stats import STATS, GuestStats
from daemon.instruments import REGISTRY as DAEMON_REGISTRY
from daemon.ledger.estimate import Component, Estimate
from daemon.ledger.ranges import LedgerSummary
from daemon.ledger.status import HostStatus
from daemon.model.constants import PAGE_SIZE

MiB = 1 << 20
GiB = 1 << 30
NOW = 1_800_000_000.0
EVENTS = ("BALLOON_CHANGE", "RESUME", "STOP", "RTC_CHANGE")
RECLAIM_COMPONENTS = (
    *RETURNED_PARTS,
    "free_resident",
    *FREE_RESIDENT_PARTS,
    "cache",
    "reclaimable",
)


# ---------------------------------------------------------------------------- the fleet


def fleet_of(count: int, seed: int = 1) -> Fleet:
    """`count` running VMs with every series set; sizes vary so values format differently."""
    rand = random.Random(seed)

    def pages(low: int, high: int) -> int:
        return rand.randrange(low // PAGE_SIZE, high // PAGE_SIZE) * PAGE_SIZE

    fleet = Fleet()
    for i in range(count):
        vm = fleet.add(f"vm-{i:04d}", f"unix:/run/qemu/vm-{i:04d}.qmp", "connect")
        vm.set_session_state(SessionState.RUNNING)
        vm.uuid = f"5f1d9f5c-0000-4000-8000-{i:012d}"
        vm.qemu_version, vm.running = "9.2.0", True
        ram = rand.choice((2, 4, 8, 16)) * GiB
        vm.memory.base_bytes, vm.memory.plugged_bytes = ram, 0
        actual = ram - pages(0, ram // 4)
        vm.balloon.present, vm.balloon.actual_bytes, vm.balloon.target_bytes = True, actual, actual
        vm.balloon.free_page_reporting, vm.balloon.deflate_on_oom = True, False
        total = actual - 64 * MiB
        free = pages(0, total // 2)
        vm.guest_stats = GuestStats(
            last_update=NOW - rand.randrange(0, 5),
            free_bytes=free,
            total_bytes=total,
            available_bytes=free + pages(0, total // 4),
            disk_caches_bytes=pages(0, total // 4),
            swap_in_bytes=pages(0, GiB),
            swap_out_bytes=pages(0, GiB),
            major_faults=rand.randrange(10**6),
            minor_faults=rand.randrange(10**9),
            hugetlb_allocations=0,
            hugetlb_failures=0,
            oom_kills=rand.randrange(3),
            alloc_stalls=rand.randrange(10**4),
            async_scans=pages(0, 100 * GiB),
            direct_scans=pages(0, 10 * GiB),
            async_reclaims=pages(0, 50 * GiB),
            direct_reclaims=pages(0, 5 * GiB),
        )
        vm.event_counts = {kind: rand.randrange(1, 1000) for kind in EVENTS}
        resident, reported = pages(ram // 4, ram // 2), pages(0, ram // 4)
        vm.host = HostStatus(
            available=True,
            problem=None,
            problem_detail=None,
            reporting_effective=True,
            scan_interval_seconds=1.0,
            ledger=LedgerSummary(
                at=NOW - 1,
                scans=rand.randrange(10**5),
                covered_bytes=ram,
                backed_bytes=resident,
                resident_bytes=resident,
                reported_bytes=reported,
                ballooned_bytes=ram - actual,
                unexplained_bytes=0,
                unattributed_bytes=0,
                reported_bytes_total=reported + pages(0, 100 * GiB),
                discarded_bytes_total=reported,
                ballooned_bytes_total=ram - actual,
                unexplained_bytes_total=0,
                refaulted_bytes_total=pages(0, 50 * GiB),
                refaulted_reported_bytes_total=0,
                first_touch_bytes_total=0,
                ranges_total=rand.randrange(10**6),
                last_reported_at=NOW - 5,
            ),
        )
        components = {
            name: Component(pages(0, ram // 4), "observed", 1.0) for name in RECLAIM_COMPONENTS
        }
        vm.estimate = Estimate(
            at=NOW,
            ram_bytes=ram,
            margin_bytes=max(64 * MiB, ram // 20),
            reporting_enabled=True,
            reporting_effective=True,
            reporting_note=None,
            components=components,
        )
    return fleet


# ---------------------------------------------------------------------------- the old path
# A copy of api/metrics.py before the text writer: prometheus_client families built per scrape.
# The tables of names are shared with api/metrics.py; only the code that walks them is copied.


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
        stat_families: list[tuple[GaugeMetricFamily | CounterMetricFamily, str]] = [
            ((_gauge if s.kind == "gauge" else _counter)(s.metric, s.help), s.field)
            for s in sorted(STATS, key=lambda s: s.kind != "gauge")
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
                    for family, field in stat_families:
                        value = getattr(stats, field)
                        if value is not None:
                            family.add_metric(labels, value)
            host.add(vm)

        yield from (up, info, running, memory, actual, target, fpr, doom)
        yield from (family for family, _ in stat_families)
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


def old_registry(fleet: Fleet) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(lambda: fleet, clock=lambda: NOW))
    registry.register(_DaemonInstruments())
    return registry


# ---------------------------------------------------------------------------- timing


def timed(scrape: Callable[[], bytes], repeat: int) -> tuple[list[float], list[float], bytes]:
    """Wall and thread-CPU milliseconds of `repeat` scrapes after one warm-up, and the body."""
    body = scrape()
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.thread_time()
        body = scrape()
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return wall, cpu, body


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="VMs in the fleet (500)")
    parser.add_argument("--repeat", type=int, default=20, help="timed scrapes per path (20)")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("RESULTS-scrape.md")
    )
    args = parser.parse_args()

    load_at_start = load_average()
    fleet = fleet_of(args.count)
    registry = old_registry(fleet)
    paths = {
        "old: prometheus_client families + generate_latest": lambda: generate_latest(registry),
        "new: api.exposition text writer": lambda: exposition(fleet, now=NOW),
    }
    results = {label: timed(scrape, args.repeat) for label, scrape in paths.items()}
    (_, _, old_body), (_, _, new_body) = results.values()
    identical = old_body == new_body
    samples = sum(1 for line in new_body.splitlines() if not line.startswith(b"#"))

    lines = [
        "# /metrics scrape benchmark",
        "",
        f"Produced by `python bench/bench_scrape.py --count {args.count} --repeat {args.repeat}`"
        f" on {time.strftime('%Y-%m-%d')}.",
        f"A fleet of {args.count} VMs with every series set (four event kinds each): "
        f"{len(new_body):,} bytes, {samples:,} samples per scrape. Each path is timed "
        f"{args.repeat} times after one warm-up scrape, in one thread, garbage collector on.",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}",
        f"- cores: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        f"- kernel: {platform.release()}",
        f"- Python: {platform.python_version()}, prometheus_client {version('prometheus_client')}",
        f"- load average (1, 5, 15 min) at start: {load_at_start}; at end: {load_average()}"
        " (the machine is shared)",
        "",
        "## Results (milliseconds of event-loop time per full scrape)",
        "",
        "| path | wall median | wall max | CPU median | CPU max | bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, (wall, cpu, body) in results.items():
        lines.append(
            f"| {label} | {statistics.median(wall):.1f} | {max(wall):.1f} "
            f"| {statistics.median(cpu):.1f} | {max(cpu):.1f} | {len(body):,} |"
        )
    (old_wall, _, _), (new_wall, _, _) = results.values()
    speedup = statistics.median(old_wall) / statistics.median(new_wall)
    lines += [
        "",
        f"- Outputs byte-identical: **{'yes' if identical else 'NO'}**",
        f"- Speed-up (wall medians): **{speedup:.1f}x**",
        "- Wall time is what the event loop is blocked for; CPU time is the scraping thread's own"
        " (the difference is time the machine gave to other work).",
    ]
    text = "\n".join(lines) + "\n"
    args.output.write_text(text)
    sys.stdout.write(text)
    if not identical:
        sys.exit("the old and new paths wrote different text")


if __name__ == "__main__":
    main()
