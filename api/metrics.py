"""``/metrics``: VM data written from the fleet at scrape time, plus the daemon's own instruments.

:func:`fleet_families` reads only the in-memory fleet: no I/O, no QMP, so a hung VM never
slows a scrape, and a VM that vanished from the fleet vanishes from the output. It writes the
text directly (``api.exposition``) rather than through prometheus_client families, because a
scrape of 500 VMs runs on the event loop and must stay cheap; the output is byte-identical to
what prometheus_client wrote for the same families (pinned by ``tests/api/golden/metrics.prom``).
Names follow Prometheus conventions: ``qemu_`` for VM data, ``reclaimd_`` for the daemon, base
units, ``_total`` only on counters (the writer appends it to counter families).
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_LATEST
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from api.exposition import Family, render, render_labels
from api.version import VERSION
from daemon.fleet import Fleet, VMState
from daemon.guest_stats import STATS
from daemon.instruments import REGISTRY as DAEMON_REGISTRY
from daemon.model import MAX_PAGE_ORDER
from daemon.untrusted import ZERO_UUID

# The text format written here is the classic 0.0.4 one (prometheus_client's CONTENT_TYPE_LATEST
# names 1.0.0, a format with UTF-8 names and escaping that this writer does not produce).
TEXT_CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
OPENMETRICS_CONTENT_TYPE: Final = OPENMETRICS_LATEST  # OpenMetrics 1.0.0
_ORDERS = tuple(str(order) for order in range(MAX_PAGE_ORDER + 1))
# The estimate's components by family, so that every family's sum over its label means
# something: what the host got back (two disjoint parts), free memory it still backs and its
# disjoint split, caches, and the total. free_resident = reportable + stranded, and the total
# counts free_resident again: one family of all of them could not be summed.
RETURNED_PARTS = ("ballooned", "reported")
FREE_RESIDENT_PARTS = ("reportable", "stranded")


def fleet_exposition(vms: Iterable[VMState], now: float) -> str:
    """The text of every ``qemu_*`` family for ``vms`` (in their order), then ``reclaimd_vms``."""
    return render(fleet_families(vms, now))


def fleet_families(vms: Iterable[VMState], now: float) -> list[Family]:
    """Every ``qemu_*`` family for ``vms`` (in their order), then ``reclaimd_vms``.

    The family order is part of the contract (the golden file pins it). A series whose input
    is unknown is absent, never a made-up 0; a family with no series keeps its HELP and TYPE.
    """
    vms = list(vms)
    up = Family("qemu_vm_up", "1 when reclaimd's QMP session to the VM is up")
    info = Family("qemu_vm_info", "VM identity; always 1")
    running = Family("qemu_vm_running", "1 when the guest CPUs run")
    memory = Family("qemu_vm_memory_bytes", "Guest RAM: base plus plugged memory")
    actual = Family("qemu_balloon_actual_bytes", "Memory the guest has now (RAM - balloon)")
    target = Family("qemu_balloon_target_bytes", "Balloon target set through reclaimd")
    fpr = Family(
        "qemu_balloon_free_page_reporting_enabled",
        "1 when the balloon device offers free page reporting",
    )
    doom = Family("qemu_balloon_deflate_on_oom_enabled", "1 when deflate-on-oom is on")
    # Gauges first, then counters, each in the table's order (the golden file pins it).
    stat_families = [
        (Family(s.metric, s.help, s.kind), s.field)
        for s in sorted(STATS, key=lambda s: s.kind != "gauge")
    ]
    # A timestamp, not an age (Prometheus' guidance): time() - it is the age at query time.
    updated = Family(
        "qemu_guest_stats_last_update_timestamp_seconds",
        "When QEMU last received guest stats (Unix time; virsh dommemstat's last_update)",
    )
    valid = Family("qemu_guest_stats_valid", "1 when guest stats passed checks, 0 when rejected")
    events = Family("qemu_events", "QMP events received from the VM, by event", "counter")
    host = _HostFamilies()

    for vm in vms:
        labels = render_labels({"vm": vm.name})  # rendered once, shared by every family
        up.add(labels, vm.up)
        info.add(
            render_labels(
                {
                    "vm": vm.name,
                    # QEMU's default UUID identifies nothing: exported as none.
                    "uuid": "" if vm.uuid in (None, ZERO_UUID) else vm.uuid,
                    "qemu_version": vm.qemu_version or "",
                    "attach": vm.attach,
                    **vm.labels,
                }
            ),
            1.0,
        )
        for event, count in sorted(vm.event_counts.items()):
            events.add(render_labels({"vm": vm.name, "event": event}), count)
        if vm.running is not None:
            running.add(labels, vm.running)
        if vm.memory.ram_bytes is not None:
            memory.add(labels, vm.memory.ram_bytes)
        balloon = vm.balloon
        if balloon.actual_bytes is not None and balloon.present:
            actual.add(labels, balloon.actual_bytes)
        if balloon.target_bytes is not None:
            target.add(labels, balloon.target_bytes)
        if balloon.free_page_reporting is not None:
            fpr.add(labels, balloon.free_page_reporting)
        if balloon.deflate_on_oom is not None:
            doom.add(labels, balloon.deflate_on_oom)
        stats = vm.guest_stats
        if stats is not None and stats.available:
            valid.add(labels, stats.valid)
            if stats.last_update is not None:
                updated.add(labels, stats.last_update)
            if stats.valid:
                for family, field in stat_families:
                    value = getattr(stats, field)
                    if value is not None:
                        family.add(labels, value)
        host.add(vm, labels)

    vm_count = Family("reclaimd_vms", "VMs known to reclaimd")
    vm_count.add("", len(vms))
    return [
        up,
        info,
        running,
        memory,
        actual,
        target,
        fpr,
        doom,
        *(family for family, _ in stat_families),
        updated,
        valid,
        events,
        *host.families(),
        vm_count,
    ]


class _HostFamilies:
    """Families from the host view, ledger and estimate (``VMState.host``, ``.estimate``)."""

    def __init__(self) -> None:
        self.resident = Family(
            "qemu_host_resident_bytes",
            "Guest RAM the host still backs (only guest RAM; virsh dommemstat's rss is the "
            "whole QEMU process)",
        )
        self.reported = Family(
            "qemu_reported_absent_bytes",
            "Guest RAM discarded by free page reporting and not touched since: absent now",
        )
        self.reported_total = Family(
            "qemu_reported_bytes", "Bytes discarded by free page reporting", "counter"
        )
        self.refaulted_total = Family(
            "qemu_refaulted_bytes", "Bytes of discarded guest RAM touched again", "counter"
        )
        self.reclaimable = Family(
            "qemu_reclaimable_bytes",
            "What the host could still get back: free resident memory and caches, less a "
            "safety margin (the estimate's total)",
        )
        self.returned = Family(
            "qemu_returned_bytes",
            "Guest RAM the host has back, by part (ballooned: held by the balloon; reported: "
            "discarded by free page reporting); the parts are disjoint",
        )
        self.free_resident = Family(
            "qemu_guest_free_resident_bytes",
            "Guest free memory (MemFree) the host still backs",
        )
        self.free_resident_parts = Family(
            "qemu_guest_free_resident_parts_bytes",
            "Free resident memory by part (reportable: in blocks reporting will return; "
            "stranded: below the reporting order, only a balloon gets it); sums to "
            "qemu_guest_free_resident_bytes",
        )
        self.cache = Family(
            "qemu_guest_reclaimable_cache_bytes",
            "Caches a balloon would squeeze out of the guest (MemAvailable - MemFree)",
        )
        self.effective = Family(
            "qemu_free_page_reporting_effective",
            "1 when reported pages are really discarded, 0 when negotiated but ineffective",
        )
        self.agent_up = Family(
            "qemu_guest_agent_up", "1 when the last read through the VM's guest agent worked"
        )
        self.recommended = Family(
            "qemu_balloon_recommended_bytes",
            "Balloon target the advice recommends (the guest's usable memory)",
        )
        self.expected_gain = Family(
            "qemu_balloon_expected_gain_bytes",
            "Host memory the recommended target returns (stranded and cache only)",
        )
        self.free_by_order = Family(
            "qemu_guest_free_by_order_bytes",
            "Guest free memory in blocks of each order (/proc/buddyinfo; from the guest agent "
            "or modelled); sums to the guest's free memory",
        )

    def add(self, vm: VMState, labels: str) -> None:
        if vm.agent is not None:
            self.agent_up.add(labels, vm.agent.ok)
        advice = vm.advice
        if advice is not None and advice.target_bytes is not None:
            self.recommended.add(labels, advice.target_bytes)
            self.expected_gain.add(labels, advice.expected_gain_bytes)
        host = vm.host
        if host is not None:
            if host.ledger is not None:
                self.resident.add(labels, host.ledger.resident_bytes)
                self.reported.add(labels, host.ledger.reported_bytes)
                self.reported_total.add(labels, host.ledger.reported_bytes_total)
                self.refaulted_total.add(labels, host.ledger.refaulted_bytes_total)
            if host.reporting_effective is not None:
                self.effective.add(labels, host.reporting_effective)
        estimate = vm.estimate
        if estimate is None:
            return
        for row in estimate.by_order:
            self.free_by_order.add(
                render_labels({"vm": vm.name, "order": _ORDERS[row.order]}), row.free_bytes
            )
        known = {k: c.bytes for k, c in estimate.components.items() if c.bytes is not None}
        for family, component in (
            (self.reclaimable, "reclaimable"),
            (self.free_resident, "free_resident"),
            (self.cache, "cache"),
        ):
            if component in known:
                family.add(labels, known[component])
        for family, parts in (
            (self.returned, RETURNED_PARTS),
            (self.free_resident_parts, FREE_RESIDENT_PARTS),
        ):
            for part in parts:
                if part in known:
                    family.add(render_labels({"vm": vm.name, "part": part}), known[part])

    def families(self) -> tuple[Family, ...]:
        return (
            self.resident,
            self.reported,
            self.reported_total,
            self.refaulted_total,
            self.reclaimable,
            self.returned,
            self.free_resident,
            self.free_resident_parts,
            self.cache,
            self.effective,
            self.agent_up,
            self.free_by_order,
            self.recommended,
            self.expected_gain,
        )


def _build_info() -> Family:
    build = Family("reclaimd_build_info", "reclaimd build; always 1")
    build.add(render_labels({"version": VERSION}), 1.0)
    return build


def exposition(fleet: Fleet, now: float | None = None, openmetrics: bool = False) -> bytes:
    """The whole ``/metrics`` body: the fleet's families, build info, the daemon's instruments.

    The daemon's counters and histograms are few and independent of the fleet's size, so they
    stay on prometheus_client. In OpenMetrics its writer closes the body with ``# EOF``.
    """
    families = (*fleet_families(fleet, time.time() if now is None else now), _build_info())
    daemon = (openmetrics_latest if openmetrics else generate_latest)(DAEMON_REGISTRY)
    return render(families, openmetrics).encode() + daemon


@dataclass(frozen=True)
class Scrape:
    """A ``/metrics`` reply: the body as the client asked for it, and its headers."""

    body: bytes
    content_type: str
    gzipped: bool


def scrape(fleet: Fleet, accept: str, accept_encoding: str) -> Scrape:
    """Content negotiation as Prometheus does it: OpenMetrics 1.0 when the ``Accept`` header
    names it, else text 0.0.4; gzip when ``Accept-Encoding`` accepts it (a 500-VM body is
    1.3 MiB of text, 84 KiB gzipped at level 1, for 2 ms more)."""
    openmetrics = _accepts(accept, "application/openmetrics-text")
    body = exposition(fleet, openmetrics=openmetrics)
    gzipped = _accepts(accept_encoding, "gzip")
    if gzipped:
        body = gzip.compress(body, compresslevel=1)  # the fastest level: it runs on the loop
    content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE
    return Scrape(body, content_type, gzipped)


def _accepts(header: str, wanted: str) -> bool:
    """Whether a comma-separated header lists ``wanted`` with a q-value above 0."""
    for item in header.split(","):
        value, *params = (part.strip() for part in item.split(";"))
        if value.lower() != wanted:
            continue
        for param in params:
            key, _, q = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    return float(q) > 0
                except ValueError:
                    return False
        return True
    return False
