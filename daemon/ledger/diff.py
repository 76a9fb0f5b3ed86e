"""Diff two residency snapshots of one mapping into reported blocks, ballooned pages and refaults.

Public API::

    changes = diff(prev, cur, npages, balloon_pages=0, min_order=9, max_order=10)
    per_block = diff_blocks([(prev, cur, npages), ...], balloon_pages=0)  # one VM, several blocks

``prev`` and ``cur`` are packed page bitmaps of backed pages (``daemon.host.bitmap``). A page that
was backed in ``prev`` and is not in ``cur`` *went absent*; the other way round it *refaulted*.

Classification of the pages that went absent, each counted exactly once:

- **reported**: free page reporting hands the host naturally aligned blocks of ``2**order``
  pages, ``min_order <= order <= max_order`` (the guest's ``page_reporting_order``, 9 by default,
  up to ``MAX_PAGE_ORDER``, 10 on x86-64). A block qualifies when all its pages are absent now and
  at least one of them went absent; the result lists maximal qualifying blocks as
  ``(page offset, order)``. Pages of such a block that were already absent belong to the block
  (the guest reported them too) but did not go absent now: ``discarded`` holds only those that did.
- **ballooned**: a balloon inflation of ``balloon_pages`` between the snapshots explains that many
  absences. Balloon pages are 4 KiB and scattered, so the absences outside reported blocks are
  given to the balloon first; if the balloon grew by more, whole blocks (lowest address first) are
  taken back from reporting, since pages the balloon took in sequence can fill an aligned block.
  The caller must read the balloon's ``actual`` after the scan: QEMU discards a page before the
  guest updates ``actual``, so an ``actual`` read later covers every discard the scan saw.
- **unexplained**: the rest (a partly refaulted block, host-side discards such as virtio-mem).

Offsets are in pages from the start of the mapping; QEMU maps RAM blocks at their start and
places them at 2 MiB-aligned (or better) guest-physical bases, so alignment in the mapping is
alignment in the guest. Everything is numpy over words and blocks; nothing loops per page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from daemon.host import bitmap
from daemon.host.bitmap import Bits
from daemon.model.constants import MAX_PAGE_ORDER

DEFAULT_MIN_ORDER = 9  # pageblock_order: page_reporting_order's default


@dataclass(frozen=True, eq=False)
class Changes:
    """How one mapping's pages changed between two snapshots (masks are packed bitmaps)."""

    npages: int
    block_offsets: NDArray[np.int64]  # first page of each reported block, ascending
    block_orders: NDArray[np.int64]
    reported: Bits  # every page of the reported blocks (all absent now)
    discarded: Bits  # pages of reported blocks that went absent between the snapshots
    ballooned: Bits  # pages that went absent, explained by the balloon
    unexplained: Bits  # pages that went absent, neither reported nor ballooned
    refaulted: Bits  # pages that were absent and are backed now

    @property
    def reported_pages(self) -> int:
        return bitmap.count(self.reported)

    @property
    def discarded_pages(self) -> int:
        return bitmap.count(self.discarded)

    @property
    def ballooned_pages(self) -> int:
        return bitmap.count(self.ballooned)

    @property
    def unexplained_pages(self) -> int:
        return bitmap.count(self.unexplained)

    @property
    def refaulted_pages(self) -> int:
        return bitmap.count(self.refaulted)

    @property
    def went_absent_pages(self) -> int:
        return self.discarded_pages + self.ballooned_pages + self.unexplained_pages

    @property
    def changed(self) -> bool:
        return bool(self.went_absent_pages or self.refaulted_pages)


def _check(prev: Bits, cur: Bits, npages: int, min_order: int, max_order: int) -> None:
    if prev.shape != cur.shape or len(cur) != bitmap.nwords(npages):
        raise ValueError("snapshots differ in size or do not match npages")
    if not 0 <= min_order <= max_order:
        raise ValueError("need 0 <= min_order <= max_order")


def _blocks(
    cur: Bits, went: Bits, npages: int, min_order: int, max_order: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Maximal aligned blocks, all absent in ``cur`` with some page in ``went``."""
    n = npages >> min_order
    absent = ~bitmap.block_any(cur, min_order, n)
    touched = bitmap.block_any(went, min_order, n)
    levels = [(absent, touched)]
    for k in range(min_order + 1, max_order + 1):
        z, a = levels[-1]
        m = npages >> k
        levels.append((z[0 : 2 * m : 2] & z[1 : 2 * m : 2], a[0 : 2 * m : 2] | a[1 : 2 * m : 2]))
    offsets: list[NDArray[np.int64]] = []
    orders: list[NDArray[np.int64]] = []
    covered: NDArray[np.bool_] | None = None  # inside a block already taken at a higher order
    for i in reversed(range(len(levels))):
        order = min_order + i
        z, a = levels[i]
        qualifies = z & a
        if covered is None:
            emit = qualifies
            covered = qualifies
        else:
            parent = np.zeros(len(qualifies), dtype=bool)
            parent[: 2 * len(covered)] = np.repeat(covered, 2)
            emit = qualifies & ~parent
            covered = parent | emit
        idx = np.flatnonzero(emit).astype(np.int64)
        offsets.append(idx << order)
        orders.append(np.full(len(idx), order, dtype=np.int64))
    off = np.concatenate(offsets)
    ords = np.concatenate(orders)
    sort = np.argsort(off, kind="stable")
    return off[sort], ords[sort]


def _classify(prev: Bits, cur: Bits, npages: int, min_order: int, max_order: int) -> Changes:
    _check(prev, cur, npages, min_order, max_order)
    went = prev & ~cur
    offsets, orders = _blocks(cur, went, npages, min_order, max_order)
    reported = bitmap.from_ranges(offsets, offsets + (1 << orders), npages)
    return Changes(
        npages=npages,
        block_offsets=offsets,
        block_orders=orders,
        reported=reported,
        discarded=went & reported,
        ballooned=np.zeros_like(cur),
        unexplained=went & ~reported,
        refaulted=cur & ~prev,
    )


def _balloon_scattered(c: Changes, pages: int) -> tuple[Changes, int]:
    take = min(pages, c.unexplained_pages)
    ballooned = bitmap.first_set(c.unexplained, take)
    return replace(c, ballooned=ballooned, unexplained=c.unexplained & ~ballooned), pages - take


def _balloon_blocks(c: Changes, pages: int) -> tuple[Changes, int]:
    """Give the balloon whole reported blocks, lowest address first, until ``pages`` are covered."""
    if pages <= 0 or len(c.block_offsets) == 0:
        return c, pages
    ends = c.block_offsets + (1 << c.block_orders)
    per_block = bitmap.count_in(c.discarded, c.block_offsets, ends)
    before = np.cumsum(per_block) - per_block
    taken = before < pages
    last = int(np.flatnonzero(taken)[-1])
    taken_mask = bitmap.from_ranges(c.block_offsets[taken], ends[taken], c.npages)
    moved = c.discarded & taken_mask
    # The last block taken may hold more absences than the balloon has left to explain.
    excess = int(before[last] + per_block[last]) - pages
    unexplained = c.unexplained
    if excess > 0:
        last_mask = bitmap.from_ranges(
            c.block_offsets[last : last + 1], ends[last : last + 1], c.npages
        )
        in_last = moved & last_mask
        keep = bitmap.first_set(in_last, int(per_block[last]) - excess)
        unexplained = unexplained | (in_last & ~keep)
        moved = moved & ~(in_last & ~keep)
    left = ~taken
    return (
        replace(
            c,
            block_offsets=c.block_offsets[left],
            block_orders=c.block_orders[left],
            reported=c.reported & ~taken_mask,
            discarded=c.discarded & ~taken_mask,
            ballooned=c.ballooned | moved,
            unexplained=unexplained,
        ),
        max(pages - int(per_block[taken].sum()), 0),
    )


def diff_blocks(
    pairs: Sequence[tuple[Bits, Bits, int]],
    *,
    balloon_pages: int = 0,
    min_order: int = DEFAULT_MIN_ORDER,
    max_order: int = MAX_PAGE_ORDER,
) -> list[Changes]:
    """Diff every ``(prev, cur, npages)`` of one VM; ``balloon_pages`` is the VM's inflation."""
    changes = [_classify(p, c, n, min_order, max_order) for p, c, n in pairs]
    left = max(balloon_pages, 0)
    for i, c in enumerate(changes):
        changes[i], left = _balloon_scattered(c, left)
    for i, c in enumerate(changes):
        changes[i], left = _balloon_blocks(c, left)
    return changes


def diff(
    prev: Bits,
    cur: Bits,
    npages: int,
    *,
    balloon_pages: int = 0,
    min_order: int = DEFAULT_MIN_ORDER,
    max_order: int = MAX_PAGE_ORDER,
) -> Changes:
    """Diff one mapping's snapshots (see the module docstring)."""
    return diff_blocks(
        [(prev, cur, npages)], balloon_pages=balloon_pages, min_order=min_order, max_order=max_order
    )[0]
