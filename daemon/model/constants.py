"""Kernel constants the model mirrors, under the kernel's own names (x86-64, 4 KiB pages)."""

from __future__ import annotations

from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

MAX_PAGE_ORDER: Final = 10
NR_PAGE_ORDERS: Final = MAX_PAGE_ORDER + 1
pageblock_order: Final = 9
pageblock_nr_pages: Final = 1 << pageblock_order
PAGE_ALLOC_COSTLY_ORDER: Final = 3

MIGRATE_UNMOVABLE: Final = 0
MIGRATE_MOVABLE: Final = 1
MIGRATE_RECLAIMABLE: Final = 2
MIGRATE_ISOLATE: Final = 3
MIGRATE_TYPES: Final = 4
MIGRATE_PCPTYPES: Final = 3
MIGRATETYPE_NAMES: Final = ("Unmovable", "Movable", "Reclaimable", "Isolate")

# mm/page_alloc.c fallbacks[]: whom each type steals from when its own lists are empty.
FALLBACKS: Final = {
    MIGRATE_UNMOVABLE: (MIGRATE_RECLAIMABLE, MIGRATE_MOVABLE),
    MIGRATE_MOVABLE: (MIGRATE_RECLAIMABLE, MIGRATE_UNMOVABLE),
    MIGRATE_RECLAIMABLE: (MIGRATE_UNMOVABLE, MIGRATE_MOVABLE),
}

# mm/page_reporting.h
PAGE_REPORTING_CAPACITY: Final = 32
PAGE_REPORTING_DELAY: Final = 2.0  # seconds (2 * HZ)
# v10 of the series: notify when nr_free >= reported + PAGE_REPORTING_HWM; worker delay HZ / 10.
PAGE_REPORTING_HWM: Final = 32
PAGE_REPORTING_V10_DELAY: Final = 0.1
# v10's virtio_balloon: report at most min(vring size, VIRTIO_BALLOON_VRING_HINTS_MAX) blocks
# per device call ("limit on the number of pages that can be on the reporting vq").
VIRTIO_BALLOON_VRING_HINTS_MAX: Final = 16

# __free_one_page() flags (fpi_t)
FPI_NONE: Final = 0
FPI_TO_TAIL: Final = 1
FPI_SKIP_REPORT_NOTIFY: Final = 2

# Per-page flag bits (one byte per page). A "head" is the first page of a block; only heads
# carry flags, and every head carries its order in the order array.
PG_BUDDY: Final = 0x01  # on a buddy free list (PageBuddy)
PG_REPORTED: Final = 0x02  # PageReported: free and already reported to the host
PG_ALLOC: Final = 0x04  # allocated block
PG_PCP: Final = 0x08  # free, on a per-CPU list
PG_ISOLATED: Final = 0x10  # free, taken off the lists by a reporting engine (__isolate_free_page)
PG_RESERVED: Final = 0x20  # never given to the buddy allocator (memblock reservations)
PG_FREE_MASK: Final = PG_BUDDY | PG_PCP | PG_ISOLATED
