"""Pure what-if functions for the reclaim estimate (no simulation clock needed).

* ``free_pages_by_order``: how a model's free memory splits across orders.
* ``split_free``: reportable (free in blocks >= the reporting order) versus stranded.
* ``reportable_by_order``: what each possible ``page_reporting_order`` would make reportable.
* ``upstream_passes`` / ``upstream_report_time``: how long upstream takes to report N pending
  blocks of a list, given capacity, budget and the 2 s delay.
* ``replay_ranges`` / ``fit_free``: rebuild a guest of a given size from the reported ranges the
  host observed, then place the rest of the guest's free memory below the reporting order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .buddy import BuddyAllocator
from .constants import (
    MIGRATE_MOVABLE,
    NR_PAGE_ORDERS,
    PAGE_REPORTING_CAPACITY,
    PAGE_REPORTING_DELAY,
    PG_BUDDY,
)

PagesByOrder = Sequence[int] | npt.NDArray[np.int64]


def free_pages_by_order(alloc: BuddyAllocator) -> npt.NDArray[np.int64]:
    """Free pages on the buddy lists per order (index = order), all zones and types."""
    return alloc.free_pages_by_order()


@dataclass(frozen=True)
class FreeSplit:
    reportable_pages: int  # free in blocks of order >= the reporting order
    stranded_pages: int  # free in smaller blocks: only a balloon gets these back


def split_free(by_order: PagesByOrder, reporting_order: int) -> FreeSplit:
    pages = [int(x) for x in by_order]
    return FreeSplit(sum(pages[reporting_order:]), sum(pages[:reporting_order]))


def reportable_by_order(by_order: PagesByOrder) -> list[int]:
    """Entry ``o``: pages that would be reportable with ``page_reporting_order = o``."""
    pages = [int(x) for x in by_order]
    return [sum(pages[o:]) for o in range(len(pages))]


def extra_reportable(by_order: PagesByOrder, current: int, other: int) -> int:
    """Pages that reporting at order ``other`` would return beyond order ``current``."""
    cumulative = reportable_by_order(by_order)
    return cumulative[other] - cumulative[current]


def upstream_passes(
    pending_blocks: int, nr_free: int, capacity: int = PAGE_REPORTING_CAPACITY
) -> int:
    """Worker passes upstream needs to report ``pending_blocks`` unreported blocks of one list.

    page_reporting_cycle() stops a list once its budget, DIV_ROUND_UP(nr_free, capacity * 16),
    goes negative: at most budget + 1 full scatterlists per list per pass. ``nr_free`` is the
    order's free block count, reported blocks included (they stay on the list).
    """
    if pending_blocks <= 0:
        return 0
    budget = math.ceil(nr_free / (capacity * 16))
    per_pass = (budget + 1) * capacity
    return math.ceil(pending_blocks / per_pass)


def upstream_report_time(
    pending_blocks: int,
    nr_free: int,
    capacity: int = PAGE_REPORTING_CAPACITY,
    delay: float = PAGE_REPORTING_DELAY,
) -> float:
    """Seconds from the first notification until ``pending_blocks`` are all reported.

    The first pass runs ``delay`` after the request and each further pass ``delay`` after the
    previous one ran out of budget.
    """
    return upstream_passes(pending_blocks, nr_free, capacity) * delay


def replay_ranges(
    total_pages: int, ranges: Iterable[tuple[int, int]], *, single_zone: bool = False
) -> BuddyAllocator:
    """A model of ``total_pages`` where exactly the given (pfn, order) ranges are free.

    Everything else is allocated in pageblock-order blocks, cut down around the ranges; the
    free ranges are then freed (and merge where they touch, as they would in the guest).
    """
    alloc = BuddyAllocator(total_pages, ncpus=1, single_zone=single_zone)
    free_mask = np.zeros(total_pages, dtype=bool)
    wanted: list[tuple[int, int]] = []
    for pfn, order in ranges:
        if pfn & ((1 << order) - 1) or pfn + (1 << order) > total_pages:
            raise ValueError(f"range {pfn}/{order} is not an aligned block of the guest")
        free_mask[pfn : pfn + (1 << order)] = True
        wanted.append((pfn, order))
    _allocate_complement(alloc, free_mask)
    return alloc


def _allocate_complement(alloc: BuddyAllocator, keep_free: npt.NDArray[np.bool_]) -> None:
    """Allocate every free page outside ``keep_free`` with the fewest aligned blocks."""
    for pfn in alloc.heads(PG_BUDDY).tolist():
        order = alloc._od[pfn]
        _allocate_block_except(alloc, pfn, order, keep_free)


def _allocate_block_except(
    alloc: BuddyAllocator, pfn: int, order: int, keep_free: npt.NDArray[np.bool_]
) -> None:
    span = keep_free[pfn : pfn + (1 << order)]
    if not span.any():
        alloc.alloc_at(pfn, order)
        return
    if span.all() or order == 0:
        return
    half = 1 << (order - 1)
    _allocate_block_except(alloc, pfn, order - 1, keep_free)
    _allocate_block_except(alloc, pfn + half, order - 1, keep_free)


@dataclass(frozen=True)
class FreeFit:
    by_order: list[int]  # fitted free pages per order
    reported_pages: int  # observed: free and reported
    placed_pages: int  # free pages placed below the reporting order
    unplaced_pages: int  # free pages that did not fit (observation inconsistent or too small)


def fit_free(
    alloc: BuddyAllocator,
    free_pages: int,
    reporting_order: int,
    profile: Sequence[float] | None = None,
    seed: int = 0,
) -> FreeFit:
    """Place the guest's free pages that reporting has not explained, below the reporting order.

    ``alloc`` comes from ``replay_ranges``: its free blocks are the observed reported ranges.
    The remaining ``free_pages - reported`` are freed as blocks of orders below the reporting
    order, drawn with weights ``profile`` (default: equal pages per order), from allocated
    memory chosen at random. The result is the fitted split across orders.
    """
    reported = int(alloc.free_pages_by_order().sum())
    remaining = max(free_pages - reported, 0)
    weights = np.array(profile if profile is not None else [1.0] * reporting_order, dtype=float)
    weights = weights[:reporting_order] / weights[:reporting_order].sum()
    rng = np.random.default_rng(seed)
    target = [int(remaining * w) for w in weights]
    placed = 0
    pool = np.flatnonzero(alloc.flags_arr == 0x04).tolist()  # allocated, not reserved
    rng.shuffle(pool)
    for order in range(reporting_order - 1, -1, -1):
        need = target[order] >> order
        while need > 0 and pool:
            head = pool.pop()
            big = alloc._od[head]
            if big < order:
                continue
            # Free one block of the wanted order out of this allocation; the rest stays used
            # as separate blocks, which go back to the pool.
            alloc.free_pages(head, big)
            alloc.drain_all_pages()
            subs = list(range(head + (1 << order), head + (1 << big), 1 << order))
            for sub in subs:
                alloc.alloc_at(sub, order)
            pool.extend(subs)
            if len(pool) > 1:
                j = int(rng.integers(len(pool)))
                pool[j], pool[-1] = pool[-1], pool[j]
            placed += 1 << order
            need -= 1
    by_order = [int(x) for x in alloc.free_pages_by_order()]
    return FreeFit(by_order, reported, placed, max(remaining - placed, 0))


__all__ = [
    "MIGRATE_MOVABLE",
    "NR_PAGE_ORDERS",
    "FreeFit",
    "FreeSplit",
    "extra_reportable",
    "fit_free",
    "free_pages_by_order",
    "replay_ranges",
    "reportable_by_order",
    "split_free",
    "upstream_passes",
    "upstream_report_time",
]
