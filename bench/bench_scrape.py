"""Event-loop time of a full /metrics scrape: prometheus_client families vs the text writer.

Builds a fleet of --count VMs shaped like real ones (every field that produces series: session,
identity, balloon, all sixteen guest stats, four event kinds, the host view's ledger and all
seven estimate components), then times the OLD path (prometheus_client families built on each
scrape and ``generate_latest``, as reclaimd wrote ``/metrics`` before ``api.exposition``) and the
NEW path (``api.metrics.exposition``), checks that both write the same bytes up to the daemon's
own instruments, and writes the numbers and the machine to RESULTS-scrape.md beside this file
(or --output).

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
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import version
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_model  # bench/machine.py: scripts run from bench/
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api import metrics
from api.metrics import FREE_RESIDENT_PARTS, RETURNED_PARTS, exposition
from daemon.fleet import Fleet
from daemon.guest_stats import GuestStats
from daemon.instruments import REGISTRY as DAEMON_REGISTRY
from daemon.ledger.estimate import Component
from daemon.model.constants import PAGE_SIZE
from tests.fleets import estimated, running_vm, scanned

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
        ram = rand.choice((2, 4, 8, 16)) * GiB
        actual = ram - pages(0, ram // 4)
        vm = running_vm(
            fleet,
            f"vm-{i:04d}",
            uuid=f"5f1d9f5c-0000-4000-8000-{i:012d}",
            qemu_version="9.2.0",
            ram=ram,
            actual=actual,
        )
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
        vm.host = scanned(
            at=NOW - 1,
            scans=rand.randrange(10**5),
            ram=ram,
            resident=resident,
            reported=reported,
            ballooned=ram - actual,
            reported_total=reported + pages(0, 100 * GiB),
            discarded_total=reported,
            refaulted_total=pages(0, 50 * GiB),
            ranges_total=rand.randrange(10**6),
            last_reported_at=NOW - 5,
        )
        components = {
            name: Component(pages(0, ram // 4), "observed", 1.0) for name in RECLAIM_COMPONENTS
        }
        vm.estimate = estimated(
            at=NOW, ram=ram, margin=max(64 * MiB, ram // 20), components=components
        )
    return fleet


# ---------------------------------------------------------------------------- the old path
# Before api.exposition, reclaimd built prometheus_client families on every scrape and had
# generate_latest write them. The old path runs api/metrics.py's own walk over the fleet with
# prometheus_client families in the text writer's place: both paths write the same families
# (names, help texts, order, samples) from the one description in api/metrics.py, and differ
# only in how the text is made.


class _ClientFamily:
    """``api.exposition.Family`` for the old path: its samples go into a prometheus_client
    family (``labels`` is the label mapping itself: see ``_unrendered``)."""

    def __init__(self, name: str, help: str, kind: str = "gauge") -> None:
        family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        self.metric: Metric = family(name, help)
        self._sample = f"{name}_total" if kind == "counter" else name

    def add(self, labels: Mapping[str, str] | str, value: float) -> None:
        self.metric.add_sample(self._sample, dict(labels or {}), value)


def _unrendered(labels: Mapping[str, str]) -> Mapping[str, str]:
    """``api.exposition.render_labels`` for the old path: prometheus_client renders them."""
    return labels


class FleetCollector(Collector):
    """Every family of the fleet as prometheus_client families, built on each scrape, then
    build info and the daemon's own instruments."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        with mock.patch.multiple(metrics, Family=_ClientFamily, render_labels=_unrendered):
            families = (*metrics.fleet_families(self._fleet, NOW), metrics._build_info())
        yield from (family.metric for family in families)
        yield from DAEMON_REGISTRY.collect()


def old_registry(fleet: Fleet) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    return registry


def fleet_part(body: bytes) -> bytes:
    """The body up to the daemon's own instruments: both paths write those with the same
    prometheus_client call, and the process's series move from one scrape to the next."""
    return body[: body.index(b"# HELP process_")]


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
    identical = fleet_part(old_body) == fleet_part(new_body)
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
