"""Guest statistics as a Linux virtio-balloon driver reports them (VIRTIO_BALLOON_S_*)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .buddy import BuddyAllocator
from .constants import PAGE_SIZE


@dataclass(frozen=True)
class GuestStats:
    """Bytes and counts under the names QEMU's ``guest-stats`` property uses."""

    stat_free_memory: int  # MEMFREE: NR_FREE_PAGES (buddy lists, not per-CPU lists)
    stat_total_memory: int  # MEMTOT: totalram, less pages the balloon holds
    stat_available_memory: int  # AVAIL: si_mem_available()
    stat_disk_caches: int  # CACHES: NR_FILE_PAGES
    stat_major_faults: int
    stat_minor_faults: int
    stat_swap_in: int = 0
    stat_swap_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def si_mem_available(alloc: BuddyAllocator, cache_pages: int) -> int:
    """si_mem_available() in pages: free less reserves, plus the cache that can be dropped."""
    zones = alloc.zones
    totalreserve = sum(max(z.lowmem_reserve, default=0) + z.wmark_high for z in zones)
    wmark_low = sum(z.wmark_low for z in zones)
    available = sum(alloc.zone_free) - totalreserve
    available += cache_pages - min(cache_pages // 2, wmark_low)
    return max(available, 0)


def guest_stats(
    alloc: BuddyAllocator,
    cache_pages: int,
    balloon_pages: int,
    major_faults: int,
    minor_faults: int,
) -> GuestStats:
    return GuestStats(
        stat_free_memory=sum(alloc.zone_free) * PAGE_SIZE,
        stat_total_memory=(alloc.managed_pages - balloon_pages) * PAGE_SIZE,
        stat_available_memory=si_mem_available(alloc, cache_pages) * PAGE_SIZE,
        stat_disk_caches=cache_pages * PAGE_SIZE,
        stat_major_faults=major_faults,
        stat_minor_faults=minor_faults,
    )
