"""Whole-state consistency checks of a ``BuddyAllocator`` (for tests and debugging).

Each check walks or vectorises over the entire state, so it is O(pages); call it between
operations in tests, never from hot paths.
"""

from __future__ import annotations

import numpy as np

from .buddy import NR_PCP_LISTS, PCP_ORDERS, BuddyAllocator
from .constants import (
    MAX_PAGE_ORDER,
    MIGRATE_ISOLATE,
    MIGRATE_PCPTYPES,
    MIGRATE_TYPES,
    NR_PAGE_ORDERS,
    PG_ALLOC,
    PG_BUDDY,
    PG_FREE_MASK,
    PG_PCP,
    PG_REPORTED,
    pageblock_order,
)


class InvariantError(AssertionError):
    pass


def _fail(msg: str) -> None:
    raise InvariantError(msg)


def check_invariants(alloc: BuddyAllocator) -> None:
    """Raise ``InvariantError`` unless every structural invariant holds.

    * every page belongs to exactly one block, free or allocated (so no page is both, and the
      total is conserved);
    * each free list is a consistent doubly linked list whose entries are PageBuddy heads of the
      list's order, zone and pageblock type, and list lengths add up to ``nr_free``;
    * no two free buddies of the same order sit unmerged, except across an isolated pageblock
      boundary at pageblock order and above (per-CPU and isolated blocks are not buddies);
    * every PageReported block is a free buddy block, and ``nr_reported`` counts them;
    * per-CPU counts match their lists; NR_FREE_PAGES matches the buddy pages outside isolation.
    """
    n = alloc.total_pages
    flags = alloc.flags_arr
    orders = alloc.order_arr.astype(np.int64)
    heads = np.flatnonzero(flags & (PG_FREE_MASK | PG_ALLOC))
    if np.any(heads & ((1 << orders[heads]) - 1)):
        _fail("a block head is not aligned to its order")
    cover = np.zeros(n + 1, dtype=np.int64)
    np.add.at(cover, heads, 1)
    np.add.at(cover, heads + (1 << orders[heads]), -1)
    owners = np.cumsum(cover[:n])
    if not np.all(owners == 1):
        bad = int(np.flatnonzero(owners != 1)[0])
        _fail(f"page {bad} belongs to {int(owners[bad])} blocks")
    if np.any(((flags & PG_REPORTED) != 0) & ((flags & PG_BUDDY) == 0)):
        _fail("a PageReported page is not a free buddy page")

    nx = alloc.next_arr
    pv = alloc.prev_arr
    nz = len(alloc.zones)
    seen = np.zeros(n, dtype=bool)
    nr_free = [0] * (nz * NR_PAGE_ORDERS)
    zone_free = [0] * nz
    for z in alloc.zones:
        for order in range(NR_PAGE_ORDERS):
            for mt in range(MIGRATE_TYPES):
                lid = alloc.list_id(z.idx, order, mt)
                s = n + lid
                count = 0
                prev = s
                pfn = int(nx[s])
                while pfn != s:
                    if not 0 <= pfn < n or int(pv[pfn]) != prev:
                        _fail(f"list {lid} broken at {pfn}")
                    if seen[pfn]:
                        _fail(f"pfn {pfn} on two lists")
                    seen[pfn] = True
                    if not flags[pfn] & PG_BUDDY or orders[pfn] != order:
                        _fail(f"pfn {pfn} on list order {order} is not a buddy of that order")
                    if not z.start_pfn <= pfn < z.end_pfn:
                        _fail(f"pfn {pfn} on a list of zone {z.name}")
                    if alloc.migratetype_of(pfn) != mt:
                        _fail(f"pfn {pfn} on list type {mt} in a pageblock of another type")
                    count += 1
                    prev = pfn
                    pfn = int(nx[pfn])
                if int(pv[s]) != prev:
                    _fail(f"list {lid} tail pointer broken")
                nr_free[z.idx * NR_PAGE_ORDERS + order] += count
                if mt != MIGRATE_ISOLATE:
                    zone_free[z.idx] += count << order
    if nr_free != alloc.nr_free:
        _fail(f"nr_free {alloc.nr_free} but lists hold {nr_free}")
    if zone_free != alloc.zone_free:
        _fail(f"NR_FREE_PAGES {alloc.zone_free} but lists hold {zone_free}")
    buddies = np.flatnonzero(flags & PG_BUDDY)
    if not np.array_equal(np.sort(np.flatnonzero(seen)), buddies):
        _fail("a PageBuddy block is on no free list")

    reported = [0] * (nz * NR_PAGE_ORDERS)
    for pfn in np.flatnonzero(flags & PG_REPORTED).tolist():
        reported[alloc.zone_of(pfn) * NR_PAGE_ORDERS + int(orders[pfn])] += 1
    if reported != alloc.nr_reported:
        _fail(f"nr_reported {alloc.nr_reported} but {reported} flagged")

    for pfn in buddies.tolist():
        order = int(orders[pfn])
        if order >= MAX_PAGE_ORDER:
            continue
        buddy = pfn ^ (1 << order)
        if flags[buddy] & PG_BUDDY and orders[buddy] == order:
            isolated = {alloc.migratetype_of(pfn), alloc.migratetype_of(buddy)}
            if order >= pageblock_order and MIGRATE_ISOLATE in isolated and len(isolated) == 2:
                continue
            _fail(f"free buddies {pfn} and {buddy} of order {order} are not merged")

    pcp_heads = set(np.flatnonzero(flags & PG_PCP).tolist())
    on_lists: set[int] = set()
    for z in alloc.zones:
        for cpu in range(alloc.ncpus):
            zc = z.idx * alloc.ncpus + cpu
            pages = 0
            for i in range(NR_PCP_LISTS):
                order = PCP_ORDERS[i // MIGRATE_PCPTYPES]
                for pfn in alloc.pcp_lists[zc * NR_PCP_LISTS + i]:
                    if int(orders[pfn]) != order or pfn in on_lists:
                        _fail(f"pcp list entry {pfn} has the wrong order or is listed twice")
                    on_lists.add(pfn)
                    pages += 1 << order
            if pages != alloc.pcp_count[zc]:
                _fail(f"pcp count {alloc.pcp_count[zc]} but lists hold {pages}")
    if on_lists != pcp_heads:
        _fail("PG_PCP flags and per-CPU lists disagree")
    allocated = heads[(flags[heads] & PG_ALLOC) != 0]
    user = allocated[(flags[allocated] & 0x20) == 0]
    if int((1 << orders[user]).sum()) != alloc.allocated_pages:
        _fail("allocated_pages does not match the allocated blocks")
