"""The allocator at the level of free pages per order: what the reclaim estimate reconciles with.

A guest's free memory, as the estimate keeps it, is a *split*: free pages per order, index =
order (``/proc/buddyinfo`` summed over zones, in pages). These pure functions move a split the
way the buddy allocator moves its free lists, and say what free page reporting makes of it. They
are the page-level allocator (``buddy``) reduced to eleven counters, so that a daemon can keep
one per VM for hundreds of VMs; ``tests/model/test_estimate.py`` holds them against it.

* ``allocate(split, pages, order)``: allocations of ``2**order`` pages, served as
  ``__rmqueue_smallest`` serves them: from the smallest order that has a block, splitting a
  larger block and leaving its unused halves (``expand``) on the lower orders.
* ``release(split, pages, profile)``: frees, landing on the orders where freed memory ends up
  after merging with its buddies; ``profile`` is that distribution (``merge_profile``).
* ``reportable_by_order`` / ``extra_reportable`` / ``split_free``: what reporting at an order
  makes reportable.
* ``upstream_passes`` / ``upstream_report_time``: how long mm/page_reporting.c takes to report
  pending blocks (capacity, per-list budget, the 2 s delay).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .constants import NR_PAGE_ORDERS, PAGE_REPORTING_CAPACITY, PAGE_REPORTING_DELAY

Split = Sequence[int]  # free pages per order, index = order


@dataclass(frozen=True)
class FreeSplit:
    reportable_pages: int  # free in blocks of order >= the reporting order
    stranded_pages: int  # free in smaller blocks: only a balloon gets these back


def split_free(by_order: Split, reporting_order: int) -> FreeSplit:
    pages = [int(x) for x in by_order]
    return FreeSplit(sum(pages[reporting_order:]), sum(pages[:reporting_order]))


def reportable_by_order(by_order: Split) -> list[int]:
    """Entry ``o``: pages that would be reportable with ``page_reporting_order = o``."""
    pages = [int(x) for x in by_order]
    return [sum(pages[o:]) for o in range(len(pages))]


def extra_reportable(by_order: Split, current: int, other: int) -> int:
    """Pages that reporting at order ``other`` would return beyond order ``current``."""
    cumulative = reportable_by_order(by_order)
    return cumulative[other] - cumulative[current]


def _blocks_of(pages: int, below: int) -> list[int]:
    """``pages`` (fewer than ``2**below``) as the blocks a split leaves: one per set bit."""
    return [pages & (1 << o) for o in range(below)]


def allocate(split: Split, pages: int, order: int = 0) -> list[int]:
    """The split after allocating ``pages`` pages in blocks of ``2**order``.

    ``__rmqueue_smallest`` takes the first block on the smallest order at or above the request
    and returns the halves it does not need to the orders below (``expand``); the next requests
    take those halves first. So allocations eat the split from its small end: whole orders, then
    part of one block of the next order, whose rest stays behind as one block per set bit. Free
    memory below ``order`` cannot serve the request and is left alone. Allocating more than is
    free takes everything that can serve.
    """
    out = [int(x) for x in split]
    need = -(-max(pages, 0) >> order) << order  # whole blocks of the requested order
    for o in range(order, len(out)):
        if need <= 0:
            break
        if need >= out[o]:
            need -= out[o]
            out[o] = 0
            continue
        block = 1 << o
        whole, rest = divmod(need, block)
        out[o] -= whole * block
        if rest and out[o] >= block:
            out[o] -= block  # one more block is split; what it does not give stays behind
            for lower, left in enumerate(_blocks_of(block - rest, o)):
                out[lower] += left
        else:  # a split kept in pages, not whole blocks: take just what is needed
            out[o] -= rest
        need = 0
    return out


def release(split: Split, pages: int, profile: Sequence[float]) -> list[int]:
    """The split after freeing ``pages`` pages that end up on the orders by ``profile``.

    ``profile`` gives, per order, the fraction of freed pages that is on that order once it has
    merged with its free buddies (it sums to 1). Pages a fraction leaves over go to order 0, so
    the split grows by exactly ``pages``.
    """
    out = [int(x) for x in split]
    if pages <= 0:
        return out
    total = sum(profile)
    placed = 0
    for o, share in enumerate(profile):
        add = int(pages * share / total) >> o << o if total > 0 else 0
        out[o] += add
        placed += add
    out[0] += pages - placed
    return out


def merge_profile(before: Split, after: Split) -> list[float] | None:
    """Where the pages freed between two splits went, per order; None when nothing was freed.

    Orders that lost pages (allocations, or merges into a larger order) count as zero.
    """
    gained = [max(0, int(a) - int(b)) for b, a in zip(before, after, strict=True)]
    total = sum(gained)
    return [g / total for g in gained] if total else None


def reported_by_upstream(
    pending_blocks: int, nr_free: int, seconds: float, capacity: int = PAGE_REPORTING_CAPACITY
) -> int:
    """Blocks of one list upstream reports within ``seconds`` of the notification."""
    if seconds < PAGE_REPORTING_DELAY or pending_blocks <= 0:
        return 0
    passes = int(seconds // PAGE_REPORTING_DELAY)
    budget = math.ceil(nr_free / (capacity * 16))
    return min(pending_blocks, passes * (budget + 1) * capacity)


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


__all__ = [
    "NR_PAGE_ORDERS",
    "FreeSplit",
    "Split",
    "allocate",
    "extra_reportable",
    "merge_profile",
    "release",
    "reportable_by_order",
    "reported_by_upstream",
    "split_free",
    "upstream_passes",
    "upstream_report_time",
]
