"""Zone layout and watermarks of a guest, computed as mm/page_alloc.c does at boot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .constants import MAX_PAGE_ORDER, PAGE_SHIFT

DMA_END_PFN = (16 << 20) >> PAGE_SHIFT  # 16 MiB
DMA32_END_PFN = (4 << 30) >> PAGE_SHIFT  # 4 GiB
# sysctl vm.lowmem_reserve_ratio defaults for DMA, DMA32, Normal
LOWMEM_RESERVE_RATIO = {"DMA": 256, "DMA32": 256, "Normal": 32}
WATERMARK_SCALE_FACTOR = 10  # vm.watermark_scale_factor, in 1/10000 of the zone


@dataclass
class Zone:
    """A zone's fixed facts. Its counters live in the allocator's flat arrays for speed."""

    idx: int
    name: str
    start_pfn: int
    end_pfn: int
    managed: int = 0  # pages given to the buddy allocator (zone_managed_pages)
    wmark_min: int = 0
    wmark_low: int = 0
    wmark_high: int = 0
    # lowmem_reserve[c]: pages kept back from allocations whose preferred zone is c
    lowmem_reserve: list[int] = field(default_factory=list)
    pcp_batch: int = 1
    pcp_high: int = 4

    @property
    def spanned(self) -> int:
        return self.end_pfn - self.start_pfn


def zone_layout(total_pages: int, single_zone: bool = False) -> list[Zone]:
    """x86-64 zones for a guest whose RAM is one contiguous range starting at PFN 0.

    Real guests have a PCI hole below 4 GiB; the model leaves it out, so guest-physical PFNs equal
    offsets into guest RAM.
    """
    align = 1 << MAX_PAGE_ORDER
    if total_pages <= 0 or total_pages % align:
        raise ValueError(f"guest size must be a positive multiple of {align} pages (4 MiB)")
    if single_zone or total_pages <= DMA_END_PFN:
        return [Zone(0, "Normal", 0, total_pages)]
    zones = [Zone(0, "DMA", 0, DMA_END_PFN)]
    zones.append(Zone(1, "DMA32", DMA_END_PFN, min(total_pages, DMA32_END_PFN)))
    if total_pages > DMA32_END_PFN:
        zones.append(Zone(2, "Normal", DMA32_END_PFN, total_pages))
    return zones


def setup_watermarks(zones: list[Zone], ncpus: int) -> None:
    """min_free_kbytes, per-zone min/low/high, lowmem_reserve and pcp batch/high.

    Follows calculate_min_free_kbytes(), __setup_per_zone_wmarks(), setup_per_zone_lowmem_reserve(),
    zone_batchsize() and zone_highsize() (with percpu_pagelist_high_fraction unset).
    """
    lowmem_pages = sum(z.managed for z in zones)
    lowmem_kbytes = lowmem_pages << (PAGE_SHIFT - 10)
    min_free_kbytes = min(max(math.isqrt(lowmem_kbytes * 16), 128), 262144)
    pages_min = min_free_kbytes >> (PAGE_SHIFT - 10)
    for z in zones:
        share = pages_min * z.managed // lowmem_pages if lowmem_pages else 0
        tmp = max(share >> 2, z.managed * WATERMARK_SCALE_FACTOR // 10000)
        z.wmark_min = share
        z.wmark_low = share + tmp
        z.wmark_high = share + 2 * tmp
    for i, z in enumerate(zones):
        reserve = [0] * len(zones)
        above = 0
        for j in range(i + 1, len(zones)):
            above += zones[j].managed
            reserve[j] = above // LOWMEM_RESERVE_RATIO[z.name]
        z.lowmem_reserve = reserve
    for z in zones:
        batch = min(z.managed >> 10, (1 << 20) >> PAGE_SHIFT) // 4
        batch = max(batch, 1)
        batch = (1 << (batch + batch // 2).bit_length() - 1) - 1 if batch > 1 else 1
        z.pcp_batch = max(batch, 1)
        z.pcp_high = max(z.wmark_low // max(ncpus, 1), 4 * z.pcp_batch)
