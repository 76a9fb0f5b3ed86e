"""What the guest kernel's counters say about its memory: ``si_meminfo()`` and vm events.

The model keeps the kernel's own quantities, in pages and counts. Turning them into
virtio-balloon statistics is the balloon driver's job (``update_balloon_stats()`` in
drivers/virtio/virtio_balloon.c), which the simulated guest does (``daemon.simguest``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .buddy import BuddyAllocator


@dataclass(frozen=True)
class MemInfo:
    """The guest kernel's memory counters at one moment."""

    free_pages: int  # NR_FREE_PAGES: the buddy lists, not the per-CPU lists
    total_pages: int  # totalram_pages(): managed pages, less those the balloon holds
    available_pages: int  # si_mem_available()
    file_pages: int  # NR_FILE_PAGES: the page cache
    pgmajfault: int
    pgfault: int
    pswpin: int = 0
    pswpout: int = 0


def si_mem_available(alloc: BuddyAllocator, cache_pages: int) -> int:
    """si_mem_available() in pages: free less reserves, plus the cache that can be dropped."""
    zones = alloc.zones
    totalreserve = sum(max(z.lowmem_reserve, default=0) + z.wmark_high for z in zones)
    wmark_low = sum(z.wmark_low for z in zones)
    available = sum(alloc.zone_free) - totalreserve
    available += cache_pages - min(cache_pages // 2, wmark_low)
    return max(available, 0)


def meminfo(
    alloc: BuddyAllocator,
    cache_pages: int,
    balloon_pages: int,
    major_faults: int,
    minor_faults: int,
) -> MemInfo:
    return MemInfo(
        free_pages=sum(alloc.zone_free),
        total_pages=alloc.managed_pages - balloon_pages,
        available_pages=si_mem_available(alloc, cache_pages),
        file_pages=cache_pages,
        pgmajfault=major_faults,
        pgfault=minor_faults,
    )
