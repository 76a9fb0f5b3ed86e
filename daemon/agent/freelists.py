"""The guest's own free lists at one moment, checked against each other and against the VM.

``FreeLists`` is the value a read through the agent produces: small (a few hundred bytes; one
per VM is held), frozen, and only built by ``build_free_lists`` from parsed guest files, which
rejects (``GuestDataRejected``) what an honest guest cannot print:

- free memory in the buddy lists, or ``MemTotal``, above the VM's RAM; ``MemFree`` or
  ``MemAvailable`` above ``MemTotal``; one zone claiming more than the VM's RAM;
- buddy lists that do not add up to ``MemFree``, beyond ``free_slack_bytes``. Both count the
  same pages: ``MemFree`` is NR_FREE_PAGES, which counts pages on the buddy lists and not those
  on the per-CPU lists (those are free too, but neither file nor free page reporting sees
  them). They differ by the per-CPU vmstat deltas not yet folded into NR_FREE_PAGES (up to 125
  pages per CPU and zone), free pages in isolated pageblocks (memory offlining, virtio-mem
  unplug), and what moved between the two reads. The reader has the agent read both files
  back to back; even so a batch of free page reporting (up to 32 blocks of 4 MiB taken off
  the lists and put back) can fall between them, so this rejection is ``transient`` and the
  reader reads once more before it gives up.

Orders past MAX_PAGE_ORDER, negative or non-numeric counts, oversized files and absurd line
counts are refused by the parsers (``daemon.agent.procfs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.agent.errors import GuestDataRejected
from daemon.agent.procfs import (
    REPORTING_INACTIVE,
    PageTypeInfo,
    ZoneFree,
    parse_buddyinfo,
    parse_meminfo,
)
from daemon.model.constants import NR_PAGE_ORDERS, PAGE_SIZE

MIB = 1024 * 1024
FREE_SLACK_MIN = 16 * MIB
# Of MemTotal: 1/32, about 3%.
FREE_SLACK_SHIFT = 5


def free_slack_bytes(mem_total_bytes: int) -> int:
    """How far the buddy lists may be from ``MemFree`` in an honest guest: 16 MiB, or 1/32 of
    ``MemTotal`` when that is larger (vmstat drift grows with CPUs and zones, and so does what
    moves between two reads)."""
    return max(FREE_SLACK_MIN, mem_total_bytes >> FREE_SLACK_SHIFT)


@dataclass(frozen=True, slots=True)
class FreeLists:
    """The guest's free memory split by order, from its own ``/proc/buddyinfo``.

    ``at``: epoch seconds when the buddyinfo and meminfo contents arrived (the agent read them
    one right after the other); ``span``: seconds from the start of the read (after
    guest-info) to ``at``, within which the reporting order and pagetypeinfo were read.
    ``by_order_pages[order]``: free pages in blocks of that order, all zones together, for
    orders 0..MAX_PAGE_ORDER. ``zones``: the per-zone block counts behind it.
    ``reporting_order``: the guest's ``page_reporting_order`` (0..MAX_PAGE_ORDER), or
    ``REPORTING_INACTIVE`` (MAX_PAGE_ORDER + 1: no reporting device registered, nothing is
    reported), or None when it could not be read (``problems`` says why); it may be up to the
    reader's ``order_ttl`` old.
    ``migratetypes``: from ``/proc/pagetypeinfo`` when the reader was asked to read it.
    ``problems``: what was wrong but did not make the split unusable, one short line each.
    """

    at: float
    span: float
    by_order_pages: tuple[int, ...]
    zones: tuple[ZoneFree, ...]
    mem_total_bytes: int
    mem_free_bytes: int
    mem_available_bytes: int | None
    reporting_order: int | None
    migratetypes: PageTypeInfo | None = None
    problems: tuple[str, ...] = ()

    @property
    def free_bytes(self) -> int:
        """Free memory on the buddy lists."""
        return sum(self.by_order_pages) * PAGE_SIZE

    def free_bytes_from(self, order: int) -> int:
        """Free memory in blocks of ``order`` or larger: what reporting at ``order`` can see."""
        return sum(self.by_order_pages[max(order, 0) :]) * PAGE_SIZE

    @property
    def reporting_active(self) -> bool | None:
        if self.reporting_order is None:
            return None
        return self.reporting_order != REPORTING_INACTIVE


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def build_free_lists(
    *,
    buddyinfo: str,
    meminfo: str,
    ram_bytes: int,
    at: float,
    span: float = 0.0,
    reporting_order: int | None = None,
    migratetypes: PageTypeInfo | None = None,
    problems: tuple[str, ...] = (),
) -> FreeLists:
    """Parse and cross-check one read. ``ram_bytes`` is the VM's RAM as the host knows it
    (QMP's memory size summary, base plus plugged); raises ``GuestDataRejected``."""
    if ram_bytes <= 0:
        raise ValueError(f"ram_bytes={ram_bytes}")
    zones = parse_buddyinfo(buddyinfo)
    mem = parse_meminfo(meminfo)
    ram = _mib(ram_bytes)
    by_order = [0] * NR_PAGE_ORDERS
    for zone in zones:
        if zone.free_pages * PAGE_SIZE > ram_bytes:
            raise GuestDataRejected(
                f"buddyinfo: node {zone.node} zone {zone.zone} claims "
                f"{_mib(zone.free_pages * PAGE_SIZE)} free, more than the VM's {ram} of RAM"
            )
        for order, count in enumerate(zone.free_blocks):
            by_order[order] += count << order
    free = sum(by_order) * PAGE_SIZE
    if free > ram_bytes:
        raise GuestDataRejected(f"buddyinfo: {_mib(free)} free, more than the VM's {ram} of RAM")
    total, mem_free = mem["MemTotal"], mem["MemFree"]
    available = mem.get("MemAvailable")
    if total > ram_bytes:
        raise GuestDataRejected(f"meminfo: MemTotal {_mib(total)} is more than the VM's {ram}")
    if mem_free > total or (available is not None and available > total):
        raise GuestDataRejected(f"meminfo: MemFree or MemAvailable above MemTotal {_mib(total)}")
    slack = free_slack_bytes(total)
    if abs(free - mem_free) > slack:
        raise GuestDataRejected(
            f"buddyinfo lists {_mib(free)} free but meminfo says MemFree {_mib(mem_free)}: "
            f"apart by more than {_mib(slack)}",
            transient=True,
        )
    if migratetypes is not None:
        typed = sum(
            count << order
            for entry in migratetypes.by_migratetype
            for order, count in enumerate(entry.free_blocks)
        )
        if typed * PAGE_SIZE > ram_bytes:
            problems += (
                f"pagetypeinfo: {_mib(typed * PAGE_SIZE)} free, more than the VM's {ram}: not used",
            )
            migratetypes = None
    return FreeLists(
        at=at,
        span=span,
        by_order_pages=tuple(by_order),
        zones=zones,
        mem_total_bytes=total,
        mem_free_bytes=mem_free,
        mem_available_bytes=available,
        reporting_order=reporting_order,
        migratetypes=migratetypes,
        problems=problems,
    )
