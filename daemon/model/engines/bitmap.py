"""``bitmap``: hinting from a per-zone bitmap of freed blocks (Nitesh Narayan Lal's series, 2019).

The free path sets one bit per block of the reporting order that reached the buddy lists at that
order or above; once ``threshold`` bits are set the worker is scheduled. The worker scans the
whole bitmap (its cost grows with zone size, not with the number of hints), and for every set bit
takes the zone lock, checks that the block is still a free buddy of at least the reporting
order, and isolates it. Blocks reallocated (or merged into a block whose head is elsewhere) in
the meantime are lost hints: the worker hunts and pecks, retaking the zone lock for every find.
Batches of ``capacity`` blocks are reported and put back to the tail without a new hint. There is
no Reported flag in this design, so a block freed again is reported again.
"""

from __future__ import annotations

import numpy as np

from ..clock import PRIO_ENGINE
from ..constants import PAGE_REPORTING_CAPACITY, PAGE_REPORTING_DELAY, PG_BUDDY
from .base import Engine, PassSteps


class BitmapEngine(Engine):
    name = "bitmap"
    description = "bitmap of freed blocks, scanned later; lossy, a zone lock per find"

    def __init__(
        self,
        order: int = 9,
        capacity: int | None = None,
        threshold: int = PAGE_REPORTING_CAPACITY,
    ) -> None:
        super().__init__(order, capacity)
        self.threshold = threshold
        self.bitmaps: list[bytearray] = []
        self.bits_set: list[int] = []
        self.scheduled = False

    def _install(self) -> None:
        alloc = self.alloc
        self.bitmaps = [bytearray(z.spanned >> self.order) for z in alloc.zones]
        self.bits_set = [0] * len(alloc.zones)
        alloc.notify_free = self._notify
        alloc.notify_order = self.order
        # Registration scans what is already free.
        for z in alloc.zones:
            for pfn in alloc.heads(PG_BUDDY).tolist():
                if z.start_pfn <= pfn < z.end_pfn and alloc._od[pfn] >= self.order:
                    self._notify(z.idx, pfn, alloc._od[pfn])

    def _notify(self, zone: int, pfn: int, order: int) -> None:
        bit = (pfn - self.alloc.zones[zone].start_pfn) >> self.order
        bitmap = self.bitmaps[zone]
        if bitmap[bit]:
            return
        bitmap[bit] = 1
        self.counters.hints += 1
        self.bits_set[zone] += 1
        if not self.scheduled and sum(self.bits_set) >= self.threshold:
            self.scheduled = True
            self.clock.schedule(PAGE_REPORTING_DELAY, self._process, PRIO_ENGINE)

    def _process(self) -> None:
        self._run(self._pass())

    def _pass(self) -> PassSteps:
        c = self.counters
        c.passes += 1
        alloc = self.alloc
        fl = alloc._fl
        od = alloc._od
        batch: list[tuple[int, int]] = []
        for z in alloc.zones:
            bitmap = self.bitmaps[z.idx]
            c.visited += len(bitmap)  # the scan reads every bit, hinted or not
            for bit in np.flatnonzero(np.frombuffer(bitmap, dtype=np.uint8)).tolist():
                bitmap[bit] = 0
                self.bits_set[z.idx] -= 1
                pfn = z.start_pfn + (bit << self.order)
                c.lock_acquisitions += 1
                c.visited_locked += 1
                if not fl[pfn] & PG_BUDDY or od[pfn] < self.order:
                    c.hints_lost += 1
                    continue
                if not alloc.isolate_free_page(pfn, od[pfn]):
                    c.isolate_failures += 1
                    continue
                batch.append((pfn, od[pfn]))
                if len(batch) == self.capacity:
                    yield from self._flush(batch)
        if batch:
            yield from self._flush(batch)
        # Bits set while device calls were in flight start the next pass; one pass at a time.
        self.scheduled = False
        if sum(self.bits_set) >= self.threshold:
            self.scheduled = True
            self.clock.schedule(PAGE_REPORTING_DELAY, self._process, PRIO_ENGINE)

    def _flush(self, batch: list[tuple[int, int]]) -> PassSteps:
        yield self._report(batch)
        self.counters.lock_acquisitions += 1
        for pfn, order in batch:
            self.alloc.putback_isolated_page(pfn, order)
        batch.clear()
