"""The written-out per-CPU refill and drain behave exactly as their one-block definitions."""

from __future__ import annotations

import types
from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.model.buddy import NR_PCP_LISTS, PCP_ORDERS, PG_PCP, BuddyAllocator
from daemon.model.checks import check_invariants
from daemon.model.constants import MIGRATE_PCPTYPES

RAM_PAGES = 65536  # 256 MiB, one zone: pcp batch 15, so refills of up to 15 blocks
PCP_HIGH = 40  # instead of 320, so that frees trim the per-CPU lists often


def rmqueue_bulk_one_by_one(
    self: BuddyAllocator, zone: int, order: int, mt: int, cpu: int, lst: deque[int]
) -> None:
    """rmqueue_bulk() as the kernel writes it: __rmqueue() once per block."""
    count = max(self._pcp_batch[zone] >> order, 2)
    self.zone_lock_acquisitions += 1
    taken = 0
    for _ in range(count):
        pfn = self._rmqueue_smallest(zone, order, mt)
        if pfn < 0:
            pfn = self._rmqueue_fallback(zone, order, mt)
            if pfn < 0:
                break
        lst.appendleft(pfn)
        self._fl[pfn] = PG_PCP
        self._od[pfn] = order
        taken += 1 << order
    self.pcp_count[zone * self.ncpus + cpu] += taken


def free_pcppages_bulk_one_by_one(self: BuddyAllocator, zone: int, cpu: int, count: int) -> None:
    """free_pcppages_bulk() as the kernel writes it: __free_one_page() once per block."""
    zc = zone * self.ncpus + cpu
    base = zc * NR_PCP_LISTS
    self.zone_lock_acquisitions += 1
    pindex = self._pcp_rr[zc]
    while count > 0 and self.pcp_count[zc] > 0:
        for _ in range(NR_PCP_LISTS):
            pindex = (pindex + 1) % NR_PCP_LISTS
            if self.pcp_lists[base + pindex]:
                break
        lst = self.pcp_lists[base + pindex]
        order = PCP_ORDERS[pindex // MIGRATE_PCPTYPES]
        while count > 0 and lst:
            pfn = lst.popleft()
            count -= 1 << order
            self.pcp_count[zc] -= 1 << order
            self._free_one(pfn, order, zone, 0)
    self._pcp_rr[zc] = pindex


def state(alloc: BuddyAllocator) -> tuple[object, ...]:
    """Everything that decides what the allocator does next, lists in order."""
    lists = []
    for lid in range(alloc.nr_lists):
        sentinel = alloc.total_pages + lid
        entries = []
        pfn = alloc._nx[sentinel]
        while pfn != sentinel:
            entries.append(pfn)
            pfn = alloc._nx[pfn]
        lists.append(entries)
    return (
        lists,
        bytes(alloc._fl),
        bytes(alloc._od),
        bytes(alloc._pbmt),
        list(alloc.nr_free),
        list(alloc.nr_reported),
        list(alloc.zone_free),
        list(alloc.boundary),
        [list(lst) for lst in alloc.pcp_lists],
        list(alloc.pcp_count),
        alloc.zone_lock_acquisitions,
        alloc.allocated_pages,
    )


# Mostly per-CPU orders, so that refills split blocks and frees trim the lists.
order = st.sampled_from([0, 0, 0, 1, 2, 3, 9, 5, 10])
op = st.one_of(
    st.tuples(st.just("alloc"), order, st.integers(0, 2), st.integers(0, 1)),
    st.tuples(st.just("free"), st.integers(0, 10_000), st.just(0), st.integers(0, 1)),
    st.tuples(st.just("drain"), st.just(0), st.just(0), st.integers(0, 1)),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(ops=st.lists(op, min_size=60, max_size=200))
def test_bulk_paths_match_one_block_at_a_time(ops: list[tuple[str, int, int, int]]) -> None:
    fast = BuddyAllocator(RAM_PAGES, ncpus=2, single_zone=True)
    slow = BuddyAllocator(RAM_PAGES, ncpus=2, single_zone=True)
    for alloc in (fast, slow):
        alloc._pcp_high[0] = PCP_HIGH
    slow._rmqueue_bulk = types.MethodType(rmqueue_bulk_one_by_one, slow)  # type: ignore[method-assign]
    slow.free_pcppages_bulk = types.MethodType(free_pcppages_bulk_one_by_one, slow)  # type: ignore[method-assign]
    live: list[tuple[int, int]] = []
    for name, a, b, cpu in ops:
        if name == "alloc":
            pfn = fast.alloc_pages(a, b, cpu)
            assert slow.alloc_pages(a, b, cpu) == pfn
            if pfn >= 0:
                live.append((pfn, a))
        elif name == "free" and live:
            pfn, order = live.pop(a % len(live))
            fast.free_pages(pfn, order, cpu)
            slow.free_pages(pfn, order, cpu)
        elif name == "drain":
            fast.drain_pages(cpu)
            slow.drain_pages(cpu)
        assert state(fast) == state(slow)
    check_invariants(fast)
