"""The Linux buddy allocator, page for page: free lists, merging, splitting, per-CPU lists.

Layout (why it is fast and small): every simulated page owns one slot in four flat arrays, with
no Python object per page:

* ``next``/``prev`` (int32): intrusive circular doubly linked free lists, one per
  (zone, order, migratetype). Each list has a sentinel node at index ``total_pages + list_id``,
  so insert at head or tail and removal are O(1) without branches.
* ``flags`` (uint8): the PG_* bits of a block's head page (constants.py).
* ``order`` (uint8): the order of the block a head page starts.

That is 10 bytes per page plus one byte per pageblock. The hot paths index the arrays through
``memoryview`` objects (int32) and ``bytearray`` objects (uint8), which Python indexes two to
three times as fast as numpy scalars; whole-array questions (free pages by order, ground truth
per page) use numpy views of the same memory.

Kernel behaviour kept, by function:

* ``__free_one_page``: merge with the buddy while it is free at the same order (never merging an
  isolated pageblock with a normal one at pageblock order and above; merged buddies of another
  type take the freed type, as 6.x does); tail placement for ``FPI_TO_TAIL`` or when
  ``buddy_merge_likely``; notify page reporting unless ``FPI_SKIP_REPORT_NOTIFY``.
* ``__rmqueue_smallest`` / ``expand``: take the head of the smallest list that fits and put the
  unused halves at the heads of their lists, unflagged.
* ``__rmqueue_fallback``: steal from the fallback types, largest block first; claim the whole
  pageblock when ``can_steal_fallback`` allows and at least half of it is free, else take one
  block from the other type's list (6.x freelist hygiene: lists always match pageblock types).
* per-CPU lists for orders 0..PAGE_ALLOC_COSTLY_ORDER and pageblock_order: ``rmqueue_bulk``
  refills with ``max(batch >> order, 2)`` blocks added at the tail; frees go to the head and the
  list is trimmed by ``batch`` pages from the tails (``free_pcppages_bulk``) once it holds
  ``high`` pages.
* watermarks, ``lowmem_reserve`` and the zonelist (Normal, DMA32, DMA): the fast path checks the
  low watermark, the slow path drains per-CPU lists, asks the reclaim hook for memory and retries
  at the min watermark.

Left out on purpose: NUMA, CMA, highatomic reserves, page shuffling (off by default), guard
pages, compaction and the PCI hole (see zones.py).

Page reporting engines plug in through ``notify_free`` (end of ``__free_one_page``) and
``free_hook`` (``arch_free_page``); the v10 ``reported_boundary`` pointers live here, as they did
in page_alloc.c.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import numpy.typing as npt

from .constants import (
    FALLBACKS,
    FPI_SKIP_REPORT_NOTIFY,
    FPI_TO_TAIL,
    MAX_PAGE_ORDER,
    MIGRATE_ISOLATE,
    MIGRATE_MOVABLE,
    MIGRATE_PCPTYPES,
    MIGRATE_RECLAIMABLE,
    MIGRATE_TYPES,
    MIGRATE_UNMOVABLE,
    NR_PAGE_ORDERS,
    PAGE_ALLOC_COSTLY_ORDER,
    PG_ALLOC,
    PG_BUDDY,
    PG_FREE_MASK,
    PG_ISOLATED,
    PG_PCP,
    PG_REPORTED,
    PG_RESERVED,
    pageblock_nr_pages,
    pageblock_order,
)
from .zones import Zone, setup_watermarks, zone_layout

PB_SHIFT = pageblock_order
# Orders kept on per-CPU lists (6.x with THP: 0..3 and pageblock_order), and their list slots.
PCP_ORDERS = (0, 1, 2, 3, pageblock_order)
ORDER_TO_SLOT = tuple(PCP_ORDERS.index(o) if o in PCP_ORDERS else -1 for o in range(NR_PAGE_ORDERS))
NR_PCP_LISTS = len(PCP_ORDERS) * MIGRATE_PCPTYPES
PCP_FLAGS = bytes((PG_PCP,)) * (1 << MAX_PAGE_ORDER)  # slices flag a refill's blocks at once

NotifyFree = Callable[[int, int, int], None]  # (zone, pfn, order)
FreeHook = Callable[[int, int], None]  # (pfn, order)
ReclaimHook = Callable[[int], int]  # (pages wanted) -> pages freed


class AllocationError(ValueError):
    """A free or a targeted allocation that does not match the allocator's state."""


class BuddyAllocator:
    """A zone set with buddy free lists, per-CPU lists and watermarks.

    ``total_pages`` must be a multiple of 1024 (4 MiB). ``reserved`` lists ``(start, end)`` PFN
    ranges that never reach the allocator (firmware, kernel image, memmap); everything else is
    freed at boot as memblock_free_all() does: aligned blocks, to the tail, no notification.
    """

    def __init__(
        self,
        total_pages: int,
        *,
        ncpus: int = 2,
        reserved: list[tuple[int, int]] | None = None,
        single_zone: bool = False,
        thp_pcp: bool = True,
    ) -> None:
        self.total_pages = n = total_pages
        self.ncpus = ncpus
        # Per-CPU list slot by order; pageblock-order blocks got pcp lists in 5.13, so with
        # ``thp_pcp`` False THP frees and allocations take the zone lock, as on 5.4-5.12.
        self._order_slot = ORDER_TO_SLOT
        if not thp_pcp:
            self._order_slot = tuple(
                -1 if o == pageblock_order else v for o, v in enumerate(ORDER_TO_SLOT)
            )
        self.zones: list[Zone] = zone_layout(total_pages, single_zone)
        nz = len(self.zones)
        self.nr_lists = nz * NR_PAGE_ORDERS * MIGRATE_TYPES
        self.next_arr = np.zeros(n + self.nr_lists, dtype=np.int32)
        self.prev_arr = np.zeros(n + self.nr_lists, dtype=np.int32)
        sentinels = np.arange(n, n + self.nr_lists, dtype=np.int32)
        self.next_arr[n:] = sentinels
        self.prev_arr[n:] = sentinels
        # The byte arrays live in bytearrays, which Python indexes faster than memoryviews;
        # the numpy arrays are views of the same memory.
        self._fl = bytearray(n)
        self._od = bytearray(n)
        npb = n >> PB_SHIFT
        self._pbmt = bytearray([MIGRATE_MOVABLE]) * npb
        self._pbz = bytearray(npb)
        self.flags_arr = np.frombuffer(self._fl, dtype=np.uint8)
        self.order_arr = np.frombuffer(self._od, dtype=np.uint8)
        self.pb_mt_arr = np.frombuffer(self._pbmt, dtype=np.uint8)
        self.pb_zone_arr = np.frombuffer(self._pbz, dtype=np.uint8)
        for z in self.zones:
            self.pb_zone_arr[z.start_pfn >> PB_SHIFT : z.end_pfn >> PB_SHIFT] = z.idx
        self._nx = self.next_arr.data
        self._pv = self.prev_arr.data

        # Counters: flat lists indexed by zone * NR_PAGE_ORDERS + order, or by list id.
        self.nr_free = [0] * (nz * NR_PAGE_ORDERS)  # free_area[order].nr_free, all types
        self.nr_reported = [0] * (nz * NR_PAGE_ORDERS)  # blocks flagged PageReported
        self.zone_free = [0] * nz  # NR_FREE_PAGES: buddy pages outside isolated pageblocks
        # v10 reported_boundary: tail insertions go in front of this node; the sentinel when unset.
        self.boundary = list(range(n, n + self.nr_lists))

        # Per-CPU lists: deques whose right end is the list head.
        self.pcp_lists: list[deque[int]] = [deque() for _ in range(nz * ncpus * NR_PCP_LISTS)]
        self.pcp_count = [0] * (nz * ncpus)
        self._pcp_rr = [0] * (nz * ncpus)

        # Work counters of the allocator itself, to put engine costs in proportion.
        self.zone_lock_acquisitions = 0
        self.alloc_failures = 0
        self.allocated_pages = 0

        self.notify_free: NotifyFree | None = None
        self.notify_order = NR_PAGE_ORDERS  # notify only for final orders >= this
        self.free_hook: FreeHook | None = None
        self.reclaim_hook: ReclaimHook | None = None

        self._boot(reserved or [])
        setup_watermarks(self.zones, ncpus)
        # Allocation order of zones (the zonelist): highest zone first.
        self.zonelist = [z.idx for z in reversed(self.zones)]
        self._wmark_low = [z.wmark_low for z in self.zones]
        self._pcp_high = [z.pcp_high for z in self.zones]
        self._pcp_batch = [z.pcp_batch for z in self.zones]

    # ------------------------------------------------------------------ boot

    def _boot(self, reserved: list[tuple[int, int]]) -> None:
        n = self.total_pages
        used = np.zeros(n, dtype=bool)
        for start, end in reserved:
            if not 0 <= start <= end <= n:
                raise ValueError(f"reserved range {start}..{end} outside 0..{n}")
            used[start:end] = True
        # Reserved ranges become reserved order-0 "allocations" so every page has an owner.
        self.flags_arr[used] = PG_ALLOC | PG_RESERVED
        bounds = np.flatnonzero(np.diff(np.concatenate(([True], used, [True])).astype(np.int8)))
        for z in self.zones:
            z.managed = z.spanned - int(used[z.start_pfn : z.end_pfn].sum())
        # Free ranges are [bounds[2k], bounds[2k+1]) in page indices.
        for start, end in zip(bounds[0::2].tolist(), bounds[1::2].tolist(), strict=True):
            self._free_range_at_boot(start, end)

    def _free_range_at_boot(self, start: int, end: int) -> None:
        # __free_pages_memory(): the largest aligned blocks, in ascending order, to the tail.
        for z in self.zones:
            lo, hi = max(start, z.start_pfn), min(end, z.end_pfn)
            pfn = lo
            while pfn < hi:
                order = min(
                    MAX_PAGE_ORDER, (pfn & -pfn).bit_length() - 1 if pfn else MAX_PAGE_ORDER
                )
                while pfn + (1 << order) > hi:
                    order -= 1
                self._free_one(pfn, order, z.idx, FPI_TO_TAIL | FPI_SKIP_REPORT_NOTIFY)
                pfn += 1 << order

    # ------------------------------------------------------------------ list primitives

    def list_id(self, zone: int, order: int, mt: int) -> int:
        return (zone * NR_PAGE_ORDERS + order) * MIGRATE_TYPES + mt

    def sentinel(self, zone: int, order: int, mt: int) -> int:
        return self.total_pages + (zone * NR_PAGE_ORDERS + order) * MIGRATE_TYPES + mt

    def zone_of(self, pfn: int) -> int:
        return self._pbz[pfn >> PB_SHIFT]

    def migratetype_of(self, pfn: int) -> int:
        """get_pageblock_migratetype()"""
        return self._pbmt[pfn >> PB_SHIFT]

    def _add(self, pfn: int, zone: int, order: int, mt: int, tail: bool) -> None:
        """__add_to_free_list(): link a block and mark it PageBuddy (not Reported)."""
        nx = self._nx
        pv = self._pv
        lid = (zone * NR_PAGE_ORDERS + order) * MIGRATE_TYPES + mt
        if tail:
            anchor = self.boundary[lid]
            p = pv[anchor]
            nx[p] = pfn
            pv[pfn] = p
            nx[pfn] = anchor
            pv[anchor] = pfn
        else:
            s = self.total_pages + lid
            nn = nx[s]
            nx[s] = pfn
            pv[pfn] = s
            nx[pfn] = nn
            pv[nn] = pfn
        self._fl[pfn] = PG_BUDDY
        self._od[pfn] = order
        self.nr_free[zone * NR_PAGE_ORDERS + order] += 1

    def _del(self, pfn: int, zone: int, order: int, mt: int) -> None:
        """__del_page_from_free_list(): unlink a block, clearing PageBuddy and PageReported."""
        nx = self._nx
        pv = self._pv
        nn = nx[pfn]
        p = pv[pfn]
        nx[p] = nn
        pv[nn] = p
        lid = (zone * NR_PAGE_ORDERS + order) * MIGRATE_TYPES + mt
        boundary = self.boundary
        if boundary[lid] == pfn:
            boundary[lid] = nn  # v10: removing the page at the boundary pushes it back
        if self._fl[pfn] & PG_REPORTED:
            self.nr_reported[zone * NR_PAGE_ORDERS + order] -= 1
        self._fl[pfn] = 0
        self.nr_free[zone * NR_PAGE_ORDERS + order] -= 1

    def _move(self, pfn: int, zone: int, order: int, old_mt: int, new_mt: int) -> None:
        """move_to_free_list(): to the tail of another type's list, keeping PageReported."""
        flag = self._fl[pfn]
        self._del(pfn, zone, order, old_mt)
        self._add(pfn, zone, order, new_mt, True)
        if flag & PG_REPORTED:
            self._fl[pfn] = PG_BUDDY | PG_REPORTED
            self.nr_reported[zone * NR_PAGE_ORDERS + order] += 1
        size = 1 << order
        if old_mt == MIGRATE_ISOLATE:
            self.zone_free[zone] += size
        elif new_mt == MIGRATE_ISOLATE:
            self.zone_free[zone] -= size

    def set_reported(self, pfn: int) -> None:
        """__SetPageReported() on a free block head."""
        fl = self._fl
        if fl[pfn] & PG_BUDDY and not fl[pfn] & PG_REPORTED:
            fl[pfn] = PG_BUDDY | PG_REPORTED
            self.nr_reported[self._pbz[pfn >> PB_SHIFT] * NR_PAGE_ORDERS + self._od[pfn]] += 1

    def iter_list(self, zone: int, order: int, mt: int) -> Iterator[int]:
        """Head-to-tail walk of one free list (for tests and inspection, not hot paths)."""
        s = self.sentinel(zone, order, mt)
        nx = self._nx
        pfn = nx[s]
        while pfn != s:
            yield pfn
            pfn = nx[pfn]

    # ------------------------------------------------------------------ freeing

    def _free_one(self, pfn: int, order: int, zone: int, fpi: int) -> int:
        """__free_one_page() of one block; returns the head PFN of the final block."""
        return self._free_blocks((pfn,), order, zone, fpi)

    def _free_blocks(self, pfns: Iterable[int], order: int, zone: int, fpi: int) -> int:
        """__free_one_page() for each block in turn: merge, place, notify.

        Every block is freed as its pageblock's migratetype (what every caller would pass).
        Returns the head PFN of the last final block. Hot path (free_pcppages_bulk() hands over
        whole batches): list removal and insertion are written out (same effect as _del/_add)
        and the allocator's state is bound to locals once per batch.
        """
        fl = self._fl
        od = self._od
        nx = self._nx
        pv = self._pv
        pbmt = self._pbmt
        boundary = self.boundary
        nr_free = self.nr_free
        nr_reported = self.nr_reported
        zone_free = self.zone_free
        n = self.total_pages
        zbase = zone * NR_PAGE_ORDERS
        to_tail_always = bool(fpi & FPI_TO_TAIL)
        notify = None if fpi & FPI_SKIP_REPORT_NOTIFY else self.notify_free
        notify_order = self.notify_order
        size = 1 << order
        freed = 0  # NR_FREE_PAGES still to add, brought up to date before any notification
        pfn = -1
        for pfn in pfns:
            fl[pfn] = 0
            mt = pbmt[pfn >> PB_SHIFT]
            if mt != MIGRATE_ISOLATE:
                freed += size
            o = order
            ix = zbase + order  # index of (zone, o) in the per-order counters
            bit = size
            while o < MAX_PAGE_ORDER:
                buddy = pfn ^ bit
                f = fl[buddy]
                if not f & PG_BUDDY or od[buddy] != o:
                    break
                lid = ix * MIGRATE_TYPES + mt
                if o >= pageblock_order:
                    bmt = pbmt[buddy >> PB_SHIFT]
                    if bmt != mt:
                        if bmt == MIGRATE_ISOLATE or mt == MIGRATE_ISOLATE:
                            break
                        lid = ix * MIGRATE_TYPES + bmt
                        # 6.x: the buddy takes the freed type, so expand() later keeps lists clean
                        first = buddy >> PB_SHIFT
                        for pb in range(first, first + (1 << (o - pageblock_order))):
                            pbmt[pb] = mt
                nn = nx[buddy]
                p = pv[buddy]
                nx[p] = nn
                pv[nn] = p
                if boundary[lid] == buddy:
                    boundary[lid] = nn
                if f & PG_REPORTED:
                    nr_reported[ix] -= 1
                fl[buddy] = 0
                nr_free[ix] -= 1
                pfn &= buddy
                o += 1
                ix += 1
                bit <<= 1
            if to_tail_always:
                to_tail = True
            elif o < MAX_PAGE_ORDER - 1:
                # buddy_merge_likely(): is the buddy of the next-higher block free at that order?
                higher_buddy = (pfn & ~bit) ^ (bit << 1)
                to_tail = fl[higher_buddy] & PG_BUDDY != 0 and od[higher_buddy] == o + 1
            else:
                to_tail = False
            lid = ix * MIGRATE_TYPES + mt
            if to_tail:
                anchor = boundary[lid]
                p = pv[anchor]
                nx[p] = pfn
                pv[pfn] = p
                nx[pfn] = anchor
                pv[anchor] = pfn
            else:
                s = n + lid
                nn = nx[s]
                nx[s] = pfn
                pv[pfn] = s
                nx[pfn] = nn
                pv[nn] = pfn
            fl[pfn] = PG_BUDDY
            od[pfn] = o
            nr_free[ix] += 1
            if notify is not None and o >= notify_order:
                zone_free[zone] += freed
                freed = 0
                notify(zone, pfn, o)
        zone_free[zone] += freed
        return pfn

    def free_pages(self, pfn: int, order: int, cpu: int = 0) -> None:
        """__free_pages(): return an allocated block. Small orders go to the CPU's pcp list."""
        fl = self._fl
        if fl[pfn] != PG_ALLOC or self._od[pfn] != order:
            raise AllocationError(f"free of pfn {pfn} order {order}: not an allocated block")
        size = 1 << order
        self.allocated_pages -= size
        hook = self.free_hook
        if hook is not None:
            fl[pfn] = 0  # no longer allocated while arch_free_page() looks at it
            hook(pfn, order)
        pb = pfn >> PB_SHIFT
        zone = self._pbz[pb]
        mt = self._pbmt[pb]
        slot = self._order_slot[order]
        if slot < 0 or mt == MIGRATE_ISOLATE:
            self.zone_lock_acquisitions += 1
            self._free_one(pfn, order, zone, 0)
            return
        zc = zone * self.ncpus + cpu
        self.pcp_lists[zc * NR_PCP_LISTS + slot * MIGRATE_PCPTYPES + mt].append(pfn)
        fl[pfn] = PG_PCP
        count = self.pcp_count[zc] + size
        self.pcp_count[zc] = count
        if count >= self._pcp_high[zone]:
            self.free_pcppages_bulk(zone, cpu, self._pcp_batch[zone])

    def free_pcppages_bulk(self, zone: int, cpu: int, count: int) -> None:
        """Give ``count`` pages back from a CPU's lists, taking tails, lists round robin."""
        zc = zone * self.ncpus + cpu
        base = zc * NR_PCP_LISTS
        lists = self.pcp_lists
        pcp_count = self.pcp_count
        self.zone_lock_acquisitions += 1
        pindex = self._pcp_rr[zc]
        while count > 0 and pcp_count[zc] > 0:
            for _ in range(NR_PCP_LISTS):
                pindex = (pindex + 1) % NR_PCP_LISTS
                if lists[base + pindex]:
                    break
            lst = lists[base + pindex]
            order = PCP_ORDERS[pindex // MIGRATE_PCPTYPES]
            size = 1 << order
            # Blocks are taken while pages are still owed: ceil(count / size), as many as listed.
            nblocks = min(len(lst), -(-count // size))
            popleft = lst.popleft
            batch = [popleft() for _ in range(nblocks)]
            count -= nblocks * size
            pcp_count[zc] -= nblocks * size
            self._free_blocks(batch, order, zone, 0)
        self._pcp_rr[zc] = pindex

    def drain_pages(self, cpu: int) -> None:
        """drain_pages(): empty one CPU's lists in every zone."""
        for z in self.zones:
            count = self.pcp_count[z.idx * self.ncpus + cpu]
            if count:
                self.free_pcppages_bulk(z.idx, cpu, count)

    def drain_all_pages(self) -> None:
        for cpu in range(self.ncpus):
            self.drain_pages(cpu)

    # ------------------------------------------------------------------ allocation

    def _rmqueue_smallest(self, zone: int, order: int, mt: int) -> int:
        # Hot path: the head removal and expand() are written out (same effect as _del/_add).
        nx = self._nx
        pv = self._pv
        fl = self._fl
        od = self._od
        n = self.total_pages
        nr_free = self.nr_free
        zbase = zone * NR_PAGE_ORDERS
        for current in range(order, NR_PAGE_ORDERS):
            lid = (zbase + current) * MIGRATE_TYPES + mt
            s = n + lid
            pfn = nx[s]
            if pfn == s:
                continue
            nn = nx[pfn]
            nx[s] = nn
            pv[nn] = s
            if self.boundary[lid] == pfn:
                self.boundary[lid] = nn
            if fl[pfn] & PG_REPORTED:
                self.nr_reported[zbase + current] -= 1
            fl[pfn] = 0
            nr_free[zbase + current] -= 1
            size = 1 << current
            while current > order:
                current -= 1
                size >>= 1
                half = pfn + size
                lid = (zbase + current) * MIGRATE_TYPES + mt
                s = n + lid
                nn = nx[s]
                nx[s] = half
                pv[half] = s
                nx[half] = nn
                pv[nn] = half
                fl[half] = PG_BUDDY
                od[half] = current
                nr_free[zbase + current] += 1
            self.zone_free[zone] -= 1 << order
            return pfn
        return -1

    def _expand(self, pfn: int, zone: int, low: int, high: int, mt: int) -> None:
        size = 1 << high
        while high > low:
            high -= 1
            size >>= 1
            self._add(pfn + size, zone, high, mt, False)

    def _rmqueue_fallback(self, zone: int, order: int, start_mt: int) -> int:
        """__rmqueue_fallback() with 6.x claim-or-steal; returns an allocated block or -1."""
        nx = self._nx
        n = self.total_pages
        found = -1
        found_order = -1
        found_mt = -1
        for current in range(MAX_PAGE_ORDER, order - 1, -1):
            for fmt in FALLBACKS[start_mt]:
                s = n + (zone * NR_PAGE_ORDERS + current) * MIGRATE_TYPES + fmt
                if nx[s] != s:
                    found, found_order, found_mt = nx[s], current, fmt
                    break
            if found >= 0:
                break
        if found < 0:
            return -1
        can_steal = found_order >= pageblock_order // 2 or start_mt in (
            MIGRATE_RECLAIMABLE,
            MIGRATE_UNMOVABLE,
        )
        if not can_steal and start_mt == MIGRATE_MOVABLE and found_order > order:
            # Movable falling back without claiming: split the smallest block, not the largest.
            for current in range(order, NR_PAGE_ORDERS):
                for fmt in FALLBACKS[start_mt]:
                    s = n + (zone * NR_PAGE_ORDERS + current) * MIGRATE_TYPES + fmt
                    if nx[s] != s:
                        found, found_order, found_mt = nx[s], current, fmt
                        break
                else:
                    continue
                break
        if found_order >= pageblock_order:
            # A whole block of pageblocks: relabel them all and move the block.
            first = found >> PB_SHIFT
            for pb in range(first, first + (1 << (found_order - pageblock_order))):
                self._pbmt[pb] = start_mt
            self._move(found, zone, found_order, found_mt, start_mt)
            return self._rmqueue_smallest(zone, order, start_mt)
        if can_steal and self.count_free_in_pageblock(found) >= pageblock_nr_pages // 2:
            self.move_freepages_block(found, start_mt)
            return self._rmqueue_smallest(zone, order, start_mt)
        # Steal one block without changing ownership of its pageblock.
        self._del(found, zone, found_order, found_mt)
        self._expand(found, zone, order, found_order, found_mt)
        self.zone_free[zone] -= 1 << order
        return found

    def _rmqueue(self, zone: int, order: int, mt: int) -> int:
        pfn = self._rmqueue_smallest(zone, order, mt)
        if pfn < 0:
            pfn = self._rmqueue_fallback(zone, order, mt)
        return pfn

    def _watermark_ok(self, zone: int, order: int, mark: int, classzone: int) -> bool:
        """__zone_watermark_ok() without highatomic and CMA."""
        free = self.zone_free[zone] - ((1 << order) - 1)
        if free <= mark + self.zones[zone].lowmem_reserve[classzone]:
            return False
        if order == 0:
            return True
        nx = self._nx
        n = self.total_pages
        for current in range(order, NR_PAGE_ORDERS):
            if not self.nr_free[zone * NR_PAGE_ORDERS + current]:
                continue
            for mt in range(MIGRATE_PCPTYPES):
                s = n + (zone * NR_PAGE_ORDERS + current) * MIGRATE_TYPES + mt
                if nx[s] != s:
                    return True
        return False

    def alloc_pages(self, order: int, mt: int = MIGRATE_MOVABLE, cpu: int = 0) -> int:
        """Allocate a block of ``2**order`` pages; returns its head PFN, or -1 if out of memory."""
        zone = self.zonelist[0]
        slot = self._order_slot[order]
        size = 1 << order
        # Fast path: preferred zone above its low watermark, block from the CPU's pcp list.
        if slot >= 0 and self.zone_free[zone] - size >= self._wmark_low[zone]:
            zc = zone * self.ncpus + cpu
            lst = self.pcp_lists[zc * NR_PCP_LISTS + slot * MIGRATE_PCPTYPES + mt]
            if not lst:
                self._rmqueue_bulk(zone, order, mt, cpu, lst)
            if lst:
                pfn = lst.pop()
                self.pcp_count[zc] -= size
                self._fl[pfn] = PG_ALLOC
                self.allocated_pages += size
                return pfn
        pfn = self._get_page_from_freelist(order, mt, cpu, use_min=False)
        if pfn < 0:
            pfn = self._alloc_slowpath(order, mt, cpu)
        return pfn

    def _get_page_from_freelist(self, order: int, mt: int, cpu: int, use_min: bool) -> int:
        classzone = self.zonelist[0]
        slot = self._order_slot[order]
        for zone in self.zonelist:
            z = self.zones[zone]
            mark = z.wmark_min if use_min else z.wmark_low
            if not self._watermark_ok(zone, order, mark, classzone):
                continue
            if slot >= 0:
                zc = zone * self.ncpus + cpu
                lst = self.pcp_lists[zc * NR_PCP_LISTS + slot * MIGRATE_PCPTYPES + mt]
                if not lst:
                    self._rmqueue_bulk(zone, order, mt, cpu, lst)
                if not lst:
                    continue
                pfn = lst.pop()
                self.pcp_count[zc] -= 1 << order
            else:
                self.zone_lock_acquisitions += 1
                pfn = self._rmqueue(zone, order, mt)
                if pfn < 0:
                    continue
                self._od[pfn] = order
            self._fl[pfn] = PG_ALLOC
            self.allocated_pages += 1 << order
            return pfn
        return -1

    def _alloc_slowpath(self, order: int, mt: int, cpu: int) -> int:
        # kswapd/direct reclaim stand-in: ask the owner of reclaimable memory, then drain pcp.
        reclaim = self.reclaim_hook
        for attempt in range(3):
            if reclaim is not None:
                want = sum(z.wmark_high - self.zone_free[z.idx] for z in self.zones)
                reclaim(max(want, 1 << order) + (1 << order))
            if attempt:
                self.drain_all_pages()
            pfn = self._get_page_from_freelist(order, mt, cpu, use_min=True)
            if pfn >= 0:
                return pfn
        self.alloc_failures += 1
        return -1

    def _rmqueue_bulk(self, zone: int, order: int, mt: int, cpu: int, lst: deque[int]) -> None:
        """rmqueue_bulk(): refill a per-CPU list with ``max(batch >> order, 2)`` blocks.

        Same effect as calling ``_rmqueue_smallest`` once per block, blocks going to the pcp
        list's tail, but the refill dominates the allocator's time, so it is written out with
        the list state in locals and each split done at once. A split only happens when every
        smaller list of the type is empty, so the calls that follow take the split block's
        pieces in ascending order (each call finds the lowest remaining piece on the smallest
        list); what the batch does not take is left as it would be: one block per level,
        alone at the head of its list.
        """
        count = max(self._pcp_batch[zone] >> order, 2)
        self.zone_lock_acquisitions += 1
        nx = self._nx
        pv = self._pv
        fl = self._fl
        od = self._od
        boundary = self.boundary
        nr_free = self.nr_free
        nr_reported = self.nr_reported
        zone_free = self.zone_free
        n = self.total_pages
        zbase = zone * NR_PAGE_ORDERS
        top = NR_PAGE_ORDERS - 1
        size = 1 << order
        got = 0
        while got < count:
            current = order
            lid = (zbase + order) * MIGRATE_TYPES + mt
            s = n + lid
            pfn = nx[s]
            while pfn == s and current < top:
                current += 1
                lid += MIGRATE_TYPES
                s += MIGRATE_TYPES
                pfn = nx[s]
            if pfn == s:
                pfn = self._rmqueue_fallback(zone, order, mt)
                if pfn < 0:
                    break
                lst.appendleft(pfn)  # list_add_tail()
                fl[pfn] = PG_PCP
                od[pfn] = order
                got += 1
                continue
            nn = nx[pfn]
            nx[s] = nn
            pv[nn] = s
            if boundary[lid] == pfn:
                boundary[lid] = nn
            if fl[pfn] & PG_REPORTED:
                nr_reported[zbase + current] -= 1
            nr_free[zbase + current] -= 1
            if current == order:
                lst.appendleft(pfn)  # list_add_tail()
                fl[pfn] = PG_PCP
                got += 1
                zone_free[zone] -= size
                continue
            # As many pieces as the batch still needs, lowest first, each to the list's tail.
            pieces = min(count - got, 1 << (current - order))
            end = pfn + pieces * size
            if pieces < 8:  # building slices costs more than a short loop
                for piece in range(pfn, end, size):
                    lst.appendleft(piece)  # list_add_tail()
                    fl[piece] = PG_PCP
                    od[piece] = order
            else:
                lst.extendleft(range(pfn, end, size))
                fl[pfn:end:size] = PCP_FLAGS[:pieces]
                od[pfn:end:size] = bytes((order,)) * pieces
            got += pieces
            zone_free[zone] -= pieces * size
            # The rest, smallest first: one block per set bit of the pieces left.
            left = (1 << (current - order)) - pieces
            half = end
            level = order
            lid = (zbase + order) * MIGRATE_TYPES + mt
            while left:
                if left & 1:
                    s = n + lid
                    nx[s] = half
                    pv[s] = half
                    nx[half] = s
                    pv[half] = s
                    fl[half] = PG_BUDDY
                    od[half] = level
                    nr_free[zbase + level] += 1
                    half += 1 << level
                left >>= 1
                level += 1
                lid += MIGRATE_TYPES
        self.pcp_count[zone * self.ncpus + cpu] += got * size

    # ------------------------------------------------------------------ targeted operations

    def free_block_containing(self, pfn: int) -> int:
        """Head PFN of the buddy free block that contains ``pfn``, or -1 if none does."""
        fl = self._fl
        od = self._od
        for order in range(NR_PAGE_ORDERS):
            head = pfn & ~((1 << order) - 1)
            if fl[head] & PG_BUDDY and od[head] >= order and head + (1 << od[head]) > pfn:
                return head
        return -1

    def owner_of(self, pfn: int) -> int:
        """Head PFN of whatever block (free, pcp, isolated or allocated) contains ``pfn``."""
        fl = self._fl
        od = self._od
        for order in range(NR_PAGE_ORDERS):
            head = pfn & ~((1 << order) - 1)
            if fl[head] and head + (1 << od[head]) > pfn:
                return head
        return -1

    def alloc_at(self, pfn: int, order: int) -> bool:
        """Allocate exactly the block ``[pfn, pfn + 2**order)`` if all of it is free.

        Used to replay traces of real PFNs and to rebuild an observed layout. A block sitting
        on a per-CPU list is first returned to the buddy lists; a larger free block around it
        is split as break_down_buddy_pages() does, the other halves going back to the heads.
        """
        if pfn & ((1 << order) - 1) or not 0 <= pfn < self.total_pages:
            raise AllocationError(f"pfn {pfn} is not aligned to order {order}")
        fl = self._fl
        od = self._od
        head = self.owner_of(pfn)
        if head < 0:
            return False
        if fl[head] & PG_PCP:
            self._pcp_remove(head)
        elif not fl[head] & PG_BUDDY:
            return False
        head = self.free_block_containing(pfn)
        if head < 0 or od[head] < order:
            return False
        zone = self._pbz[head >> PB_SHIFT]
        mt = self._pbmt[head >> PB_SHIFT]
        if mt == MIGRATE_ISOLATE:
            return False
        high = od[head]
        self.zone_lock_acquisitions += 1
        self._del(head, zone, high, mt)
        # Split down towards the target, freeing the halves that do not contain it.
        while high > order:
            high -= 1
            size = 1 << high
            if pfn >= head + size:
                self._add(head, zone, high, mt, False)
                head += size
            else:
                self._add(head + size, zone, high, mt, False)
        self.zone_free[zone] -= 1 << order
        fl[pfn] = PG_ALLOC
        od[pfn] = order
        self.allocated_pages += 1 << order
        return True

    def _pcp_remove(self, pfn: int) -> None:
        order = self._od[pfn]
        zone = self._pbz[pfn >> PB_SHIFT]
        for cpu in range(self.ncpus):
            zc = zone * self.ncpus + cpu
            for mt in range(MIGRATE_PCPTYPES):
                lst = self.pcp_lists[
                    zc * NR_PCP_LISTS + self._order_slot[order] * MIGRATE_PCPTYPES + mt
                ]
                if pfn in lst:
                    lst.remove(pfn)
                    self.pcp_count[zc] -= 1 << order
                    self._fl[pfn] = 0
                    self.zone_lock_acquisitions += 1
                    self._free_one(pfn, order, zone, 0)
                    return
        raise AllocationError(f"pfn {pfn} flagged PCP but on no pcp list")

    # ------------------------------------------------------------------ engine services

    def isolate_free_page(self, pfn: int, order: int) -> bool:
        """__isolate_free_page(): take a free block off its list, obeying the min watermark."""
        pb = pfn >> PB_SHIFT
        zone = self._pbz[pb]
        mt = self._pbmt[pb]
        z = self.zones[zone]
        if mt != MIGRATE_ISOLATE:
            if self.zone_free[zone] <= z.wmark_min + (1 << order):
                return False
            self.zone_free[zone] -= 1 << order
        self._del(pfn, zone, order, mt)
        self._fl[pfn] = PG_ISOLATED
        self._od[pfn] = order
        if order >= pageblock_order - 1:
            # At least half a pageblock: make its pageblocks movable.
            end = pfn + (1 << order)
            for start in range(pfn & ~(pageblock_nr_pages - 1), end, pageblock_nr_pages):
                old = self._pbmt[start >> PB_SHIFT]
                if old != MIGRATE_ISOLATE and old != MIGRATE_MOVABLE:
                    self.move_freepages_block(start, MIGRATE_MOVABLE)
        return True

    def putback_isolated_page(self, pfn: int, order: int) -> int:
        """__putback_isolated_page(): back to the tail, merging, with no report notification.

        Returns the head of the block the page ended up in (itself if it did not merge).
        """
        if self._fl[pfn] != PG_ISOLATED:
            raise AllocationError(f"pfn {pfn} is not isolated")
        self._fl[pfn] = 0
        zone = self._pbz[pfn >> PB_SHIFT]
        return self._free_one(pfn, order, zone, FPI_TO_TAIL | FPI_SKIP_REPORT_NOTIFY)

    def count_free_in_pageblock(self, pfn: int) -> int:
        start = pfn & ~(pageblock_nr_pages - 1)
        fl = self._fl
        od = self._od
        free = 0
        p = start
        end = start + pageblock_nr_pages
        while p < end:
            f = fl[p]
            if f & PG_BUDDY:
                free += 1 << od[p]
                p += 1 << od[p]
            elif f:
                p += 1 << od[p]
            else:
                p += 1
        return free

    def move_freepages_block(self, pfn: int, new_mt: int) -> int:
        """move_freepages_block() + set_pageblock_migratetype(); returns pages moved.

        Steps over the pageblock as the kernel does (one struct page at a time, skipping whole
        blocks at known heads). A free block larger than the pageblock moves whole and relabels
        every pageblock it spans.
        """
        start = pfn & ~(pageblock_nr_pages - 1)
        zone = self._pbz[start >> PB_SHIFT]
        fl = self._fl
        od = self._od
        pbmt = self._pbmt
        outer = self.free_block_containing(start)
        if outer >= 0 and od[outer] > pageblock_order:
            order = od[outer]
            old = pbmt[outer >> PB_SHIFT]
            first = outer >> PB_SHIFT
            for pb in range(first, first + (1 << (order - pageblock_order))):
                pbmt[pb] = new_mt
            if old != new_mt:
                self._move(outer, zone, order, old, new_mt)
            return 1 << order
        old_mt = pbmt[start >> PB_SHIFT]
        pbmt[start >> PB_SHIFT] = new_mt
        moved = 0
        p = start
        end = start + pageblock_nr_pages
        while p < end:
            f = fl[p]
            if f & PG_BUDDY:
                order = od[p]
                if old_mt != new_mt:
                    self._move(p, zone, order, old_mt, new_mt)
                moved += 1 << order
                p += 1 << order
            elif f:
                p += 1 << od[p]
            else:
                p += 1
        return moved

    # ------------------------------------------------------------------ whole-state views

    def free_pages_by_order(self) -> npt.NDArray[np.int64]:
        """Free pages in buddy lists per order, all zones and types: ``nr_free * 2**order``."""
        nz = len(self.zones)
        counts = np.array(self.nr_free, dtype=np.int64).reshape(nz, NR_PAGE_ORDERS).sum(axis=0)
        pages: npt.NDArray[np.int64] = counts << np.arange(NR_PAGE_ORDERS, dtype=np.int64)
        return pages

    def free_page_count(self) -> int:
        """Free pages: buddy lists (all types), per-CPU lists and blocks isolated by engines."""
        return int(self.total_pages - self.allocated_pages - self.reserved_pages)

    @property
    def reserved_pages(self) -> int:
        return sum(z.spanned - z.managed for z in self.zones)

    @property
    def managed_pages(self) -> int:
        return sum(z.managed for z in self.zones)

    def heads(self, mask: int) -> npt.NDArray[np.intp]:
        """PFNs of block heads whose flags intersect ``mask``."""
        return np.flatnonzero(self.flags_arr & mask)

    def expand_blocks(self, heads: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        """Boolean per-page mask covering the blocks that start at ``heads``."""
        mask = np.zeros(self.total_pages, dtype=bool)
        orders = self.order_arr[heads]
        for order in np.unique(orders).tolist():
            sel = heads[orders == order]
            span = (sel[:, None] + np.arange(1 << order)).ravel()
            mask[span] = True
        return mask

    def pcp_pages(self) -> int:
        return sum(self.pcp_count)


__all__ = [
    "MIGRATE_ISOLATE",
    "MIGRATE_MOVABLE",
    "MIGRATE_RECLAIMABLE",
    "MIGRATE_UNMOVABLE",
    "NR_PCP_LISTS",
    "PAGE_ALLOC_COSTLY_ORDER",
    "PCP_ORDERS",
    "PG_ALLOC",
    "PG_BUDDY",
    "PG_FREE_MASK",
    "PG_ISOLATED",
    "PG_PCP",
    "PG_REPORTED",
    "PG_RESERVED",
    "AllocationError",
    "BuddyAllocator",
]
