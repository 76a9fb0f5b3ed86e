"""The per-VM ledger: reported ranges, ballooned and refaulted memory, from successive scans.

Public API::

    ledger = Ledger(history=10_000, min_order=9, max_order=10, gpa_map=None)
    obs = ledger.observe(scan, balloon_actual)   # scan: daemon.host.view.GuestRamScan
    ledger.summary()                             # LedgerSummary after the last scan
    ledger.summary_near(at)                      # ... after the scan nearest to ``at``
    ledger.history.query(since=None, limit=None) # bounded history of ReportedRange, oldest first

``balloon_actual`` is the balloon's ``actual`` in bytes read after the scan (``query-balloon`` or
the latest ``BALLOON_CHANGE``), None without a balloon. Its fall since the previous scan is the
inflation that explains absences (see ``daemon.ledger.diff``).

Every page of guest RAM is, after each scan, either backed, or absent for a known cause
(reported, ballooned, unexplained), or absent since before reclaimd first saw it
(``unattributed``: never touched by the guest, or discarded before the first scan). The four
absent kinds are disjoint, so the byte counts in the summary never add up to more than the RAM
the host view covers. A page leaves its cause when it is backed again: that is a *refault* if it
had a cause, a *first touch* if it was unattributed.

Counters only grow: ``reported_bytes_total`` counts each page as it joins a reported range (a page
already counted that becomes part of a larger reported block is not counted again until it has
refaulted), ``discarded_bytes_total`` the part of those the host held until then.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from daemon.host import bitmap
from daemon.host.bitmap import Bits
from daemon.host.mtree import GuestPhysMap
from daemon.host.view import BlockScan, GuestRamScan
from daemon.ledger.diff import DEFAULT_MIN_ORDER, Changes, diff_blocks
from daemon.model.constants import MAX_PAGE_ORDER, PAGE_SIZE

SUMMARIES_KEPT = 8


@dataclass(frozen=True)
class ReportedRange:
    """A block of guest RAM that free page reporting returned to the host."""

    at: float  # epoch seconds: end of the scan that first saw it absent
    block: str  # RAM block name
    offset: int  # bytes from the start of the RAM block
    length: int  # bytes: PAGE_SIZE << order
    order: int
    gpa: int | None  # guest-physical address, when the memory tree is known
    discarded: int  # bytes of it the host backed until this scan (the rest was already absent)


@dataclass(frozen=True)
class Observation:
    """What one scan changed, in bytes."""

    at: float
    ranges: tuple[ReportedRange, ...]
    reported: int  # newly in reported ranges
    discarded: int  # of which the host backed until now
    ballooned: int
    unexplained: int
    refaulted: int
    first_touch: int
    balloon_grew: int  # balloon inflation since the previous scan

    @property
    def changed(self) -> bool:
        return bool(
            self.reported
            or self.ballooned
            or self.unexplained
            or self.refaulted
            or self.first_touch
        )


@dataclass(frozen=True)
class LedgerSummary:
    """Current bytes and counters of one VM's ledger (what the API serializes)."""

    at: float | None  # end of the last scan observed
    scans: int
    covered_bytes: int  # guest RAM the host view covers
    backed_bytes: int  # present or swapped
    resident_bytes: int  # present in host RAM
    reported_bytes: int  # absent: in reported ranges, not refaulted since
    ballooned_bytes: int  # absent: explained by balloon inflation, not refaulted since
    unexplained_bytes: int  # absent: went absent with no cause we can name
    unattributed_bytes: int  # absent since before the first scan
    reported_bytes_total: int
    discarded_bytes_total: int
    ballooned_bytes_total: int
    unexplained_bytes_total: int
    refaulted_bytes_total: int  # absent pages with a cause that were backed again
    refaulted_reported_bytes_total: int  # of which had been reported
    first_touch_bytes_total: int
    ranges_total: int
    last_reported_at: float | None


class RangeHistory:
    """The newest reported ranges of one VM, oldest first, and how many there were in all."""

    def __init__(self, maxlen: int) -> None:
        self._ranges: deque[ReportedRange] = deque(maxlen=maxlen)
        self.total = 0

    def extend(self, ranges: Sequence[ReportedRange]) -> None:
        self._ranges.extend(ranges)
        self.total += len(ranges)

    def numbered(self) -> list[tuple[int, ReportedRange]]:
        """Ranges kept, oldest first, each with its number: 1 for the first range ever seen,
        so a number names the same range for as long as it is kept (a paging cursor)."""
        first = self.total - len(self._ranges) + 1
        return list(enumerate(self._ranges, start=first))

    def query(self, since: float | None = None, limit: int | None = None) -> list[ReportedRange]:
        """Ranges kept, oldest first, seen after ``since``; ``limit`` keeps the newest."""
        out = [r for r in self._ranges if since is None or r.at > since]
        return out[-limit:] if limit is not None and limit > 0 else out


class _BlockState:
    """Page sets of one RAM block; the four absent sets are disjoint and never backed."""

    def __init__(self, npages: int, backed: Bits) -> None:
        self.npages = npages
        self.backed = backed
        self.resident_pages = 0
        self.reported = bitmap.zeros(npages)
        self.ballooned = bitmap.zeros(npages)
        self.unexplained = bitmap.zeros(npages)


class Ledger:
    """Reported ranges, ballooned and refaulted memory of one VM (see the module docstring)."""

    def __init__(
        self,
        *,
        history: int = 10_000,
        min_order: int = DEFAULT_MIN_ORDER,
        max_order: int = MAX_PAGE_ORDER,
        gpa_map: GuestPhysMap | None = None,
    ) -> None:
        self.min_order = min_order
        self.max_order = max_order
        self.gpa_map = gpa_map
        self.history = RangeHistory(history)
        # The summaries after the last few scans, so inputs of another time (guest stats are a
        # poll old) can be matched with the scan of that moment.
        self._summaries: deque[LedgerSummary] = deque(maxlen=SUMMARIES_KEPT)
        self._blocks: dict[str, _BlockState] = {}
        self._balloon_actual: int | None = None
        self.at: float | None = None
        self.scans = 0
        self.last_reported_at: float | None = None
        self.reported_bytes_total = 0
        self.discarded_bytes_total = 0
        self.ballooned_bytes_total = 0
        self.unexplained_bytes_total = 0
        self.refaulted_bytes_total = 0
        self.refaulted_reported_bytes_total = 0
        self.first_touch_bytes_total = 0

    def observe(self, scan: GuestRamScan, balloon_actual: int | None = None) -> Observation:
        """Take in one scan; ``balloon_actual`` must be read after it (see the module docstring)."""
        grew = 0
        if balloon_actual is not None and self._balloon_actual is not None:
            grew = max(self._balloon_actual - balloon_actual, 0) // PAGE_SIZE
        self._balloon_actual = balloon_actual
        known: list[tuple[BlockScan, _BlockState]] = []
        for b in scan.blocks:
            state = self._blocks.get(b.mapping.name)
            snap = b.snapshot
            if state is None or state.npages != snap.npages:
                fresh = _BlockState(snap.npages, snap.backed)
                fresh.resident_pages = snap.resident_pages
                self._blocks[b.mapping.name] = fresh
            else:
                known.append((b, state))
        changes = diff_blocks(
            [(s.backed, b.snapshot.backed, s.npages) for b, s in known],
            balloon_pages=grew,
            min_order=self.min_order,
            max_order=self.max_order,
        )
        at = scan.at
        totals = np.zeros(6, dtype=np.int64)
        ranges: list[ReportedRange] = []
        for (b, state), c in zip(known, changes, strict=True):
            totals += self._apply(state, c)
            ranges.extend(self._ranges(b, c, at))
            state.backed = b.snapshot.backed
            state.resident_pages = b.snapshot.resident_pages
        reported, discarded, ballooned, unexplained, refaulted, first = (
            int(x) * PAGE_SIZE for x in totals
        )
        self.history.extend(ranges)
        if ranges:
            self.last_reported_at = at
        self.reported_bytes_total += reported
        self.discarded_bytes_total += discarded
        self.ballooned_bytes_total += ballooned
        self.unexplained_bytes_total += unexplained
        self.refaulted_bytes_total += refaulted
        self.first_touch_bytes_total += first
        self.at = at
        self.scans += 1
        self._summaries.append(self._summarize())
        return Observation(
            at=at,
            ranges=tuple(ranges),
            reported=reported,
            discarded=discarded,
            ballooned=ballooned,
            unexplained=unexplained,
            refaulted=refaulted,
            first_touch=first,
            balloon_grew=grew * PAGE_SIZE,
        )

    def confirm(self, at: float) -> None:
        """The host view was found unchanged at ``at`` without a scan (``HostView.unchanged``):
        the last scan's figures hold then, as if a scan at ``at`` had seen nothing change."""
        if not self._summaries or (self.at is not None and at <= self.at):
            return
        self.at = at
        self._summaries.append(replace(self._summaries[-1], at=at))

    def _apply(self, s: _BlockState, c: Changes) -> list[int]:
        """Move pages between the block's sets; page counts of what changed."""
        caused = s.reported | s.ballooned | s.unexplained
        refaulted = c.refaulted & caused
        refaulted_reported = bitmap.count(c.refaulted & s.reported)
        first = bitmap.count(c.refaulted & ~caused)
        back = ~c.refaulted
        new_reported = c.reported & ~s.reported
        s.reported = (s.reported & back) | c.reported
        s.ballooned = ((s.ballooned & back) | c.ballooned) & ~c.reported
        s.unexplained = ((s.unexplained & back) | c.unexplained) & ~c.reported
        self.refaulted_reported_bytes_total += refaulted_reported * PAGE_SIZE
        return [
            bitmap.count(new_reported),
            bitmap.count(c.discarded & new_reported),
            c.ballooned_pages,
            c.unexplained_pages,
            bitmap.count(refaulted),
            first,
        ]

    def _ranges(self, b: BlockScan, c: Changes, at: float) -> Iterable[ReportedRange]:
        if len(c.block_offsets) == 0:
            return []
        ends = c.block_offsets + (1 << c.block_orders)
        discarded = bitmap.count_in(c.discarded, c.block_offsets, ends)
        name = b.mapping.name
        out = []
        for first, order, held in zip(
            c.block_offsets.tolist(), c.block_orders.tolist(), discarded.tolist(), strict=True
        ):
            offset, length = first * PAGE_SIZE, PAGE_SIZE << order
            gpa = self.gpa_map.gpa(name, offset, length) if self.gpa_map else None
            out.append(ReportedRange(at, name, offset, length, order, gpa, held * PAGE_SIZE))
        return out

    def summary(self) -> LedgerSummary:
        """Counters and current bytes after the last scan."""
        return self._summaries[-1] if self._summaries else self._summarize()

    def summary_near(self, at: float) -> LedgerSummary:
        """The summary after the scan nearest to ``at`` (of the last few)."""
        if not self._summaries:
            return self._summarize()
        return min(self._summaries, key=lambda s: abs((s.at or 0.0) - at))

    def _summarize(self) -> LedgerSummary:
        npages = backed = resident = reported = ballooned = unexplained = 0
        for s in self._blocks.values():
            npages += s.npages
            backed += bitmap.count(s.backed)
            resident += s.resident_pages
            reported += bitmap.count(s.reported)
            ballooned += bitmap.count(s.ballooned)
            unexplained += bitmap.count(s.unexplained)
        return LedgerSummary(
            at=self.at,
            scans=self.scans,
            covered_bytes=npages * PAGE_SIZE,
            backed_bytes=backed * PAGE_SIZE,
            resident_bytes=resident * PAGE_SIZE,
            reported_bytes=reported * PAGE_SIZE,
            ballooned_bytes=ballooned * PAGE_SIZE,
            unexplained_bytes=unexplained * PAGE_SIZE,
            unattributed_bytes=(npages - backed - reported - ballooned - unexplained) * PAGE_SIZE,
            reported_bytes_total=self.reported_bytes_total,
            discarded_bytes_total=self.discarded_bytes_total,
            ballooned_bytes_total=self.ballooned_bytes_total,
            unexplained_bytes_total=self.unexplained_bytes_total,
            refaulted_bytes_total=self.refaulted_bytes_total,
            refaulted_reported_bytes_total=self.refaulted_reported_bytes_total,
            first_touch_bytes_total=self.first_touch_bytes_total,
            ranges_total=self.history.total,
            last_reported_at=self.last_reported_at,
        )
