"""The host side: which guest pages the hypervisor has discarded, and what that costs later.

QEMU's virtio-balloon answers a free page report with MADV_DONTNEED (or a hole punch) on each
range; the guest's next touch of such a page faults in a fresh zero page. ``Host`` keeps one
byte per guest page saying whether the host still backs it, and counts the refaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

PRESENT = 0
REPORTED = 1  # discarded because the guest reported it free
BALLOONED = 2  # discarded because the balloon took it


@dataclass
class HostCounters:
    reports: int = 0  # report requests received (one per block)
    pages_discarded: int = 0  # pages that went from backed to discarded
    blocks_reported_again: int = 0  # reported blocks that were already (partly) discarded
    pages_reported_again: int = 0
    refaults: int = 0  # guest touches of pages discarded by reporting
    balloon_faults: int = 0  # guest touches of pages given back by a balloon deflate


class Host:
    """Backing state of guest RAM as the host sees it."""

    def __init__(self, total_pages: int) -> None:
        self.total_pages = total_pages
        self.state = bytearray(total_pages)
        self.state_arr: npt.NDArray[np.uint8] = np.frombuffer(self.state, dtype=np.uint8)
        self.reported_pages = 0  # currently discarded by reporting
        self.ballooned_pages = 0  # currently held by the balloon
        self.counters = HostCounters()

    def discard(self, pfn: int, order: int) -> int:
        """A reported block: discard it. Returns how many pages were newly discarded."""
        n = 1 << order
        c = self.counters
        c.reports += 1
        backed = self.state.count(PRESENT, pfn, pfn + n)
        if backed < n:
            c.blocks_reported_again += 1
            c.pages_reported_again += n - backed
        if backed:
            seg = self.state_arr[pfn : pfn + n]
            seg[seg == PRESENT] = REPORTED
            self.reported_pages += backed
            c.pages_discarded += backed
        return backed

    def touch(self, pfn: int, order: int) -> int:
        """The guest writes a newly allocated block. Returns pages faulted back in."""
        if not (self.reported_pages or self.ballooned_pages):
            return 0
        state = self.state
        if order == 0:
            v = state[pfn]
            if not v:
                return 0
            state[pfn] = PRESENT
            self._faulted(v, 1)
            return 1
        n = 1 << order
        if state.count(PRESENT, pfn, pfn + n) == n:
            return 0
        seg = self.state_arr[pfn : pfn + n]
        reported = int(np.count_nonzero(seg == REPORTED))
        ballooned = int(np.count_nonzero(seg == BALLOONED))
        seg[:] = PRESENT
        if reported:
            self._faulted(REPORTED, reported)
        if ballooned:
            self._faulted(BALLOONED, ballooned)
        return reported + ballooned

    def _faulted(self, kind: int, pages: int) -> None:
        if kind == REPORTED:
            self.reported_pages -= pages
            self.counters.refaults += pages
        else:
            self.ballooned_pages -= pages
            self.counters.balloon_faults += pages

    def balloon_take(self, pfn: int) -> None:
        """The balloon driver handed this page to the host (inflate)."""
        old = self.state[pfn]
        if old == REPORTED:
            self.reported_pages -= 1
        if old != BALLOONED:
            self.state[pfn] = BALLOONED
            self.ballooned_pages += 1

    def absent_pages(self) -> int:
        return self.reported_pages + self.ballooned_pages
