"""``isolate``: capture hints, check the block is still free, isolate it, report, un-isolate.

David Hildenbrand's preferred shape in the thread: the free path only records (pfn, order) hints
for blocks that reached the reporting order, in a bounded per-zone buffer (hints beyond it are
dropped). ``PAGE_REPORTING_DELAY`` after the first hint the worker takes each hint under the
zone lock, finds the free block that now contains it, and isolates that block's pageblock(s)
(MIGRATE_ISOLATE, as alloc_contig_range does): the pages stay free and counted as buddy pages,
but no allocation can take them. Batches of ``capacity`` blocks are reported; then each
pageblock gets its type back, with one more lock acquisition, and the block is flagged Reported
if it is still the same block. Hints whose block was reallocated are lost.
"""

from __future__ import annotations

from ..clock import PRIO_ENGINE
from ..constants import (
    MIGRATE_ISOLATE,
    PAGE_REPORTING_DELAY,
    PG_BUDDY,
    PG_REPORTED,
    pageblock_nr_pages,
    pageblock_order,
)
from .base import Engine, PassSteps

HINT_BUFFER = 512


class IsolateEngine(Engine):
    name = "isolate"
    description = "captured hints; check, isolate pageblock, report, un-isolate"

    def __init__(
        self, order: int = 9, capacity: int | None = None, buffer: int = HINT_BUFFER
    ) -> None:
        super().__init__(order, capacity)
        self.buffer = buffer
        self.hints: list[list[tuple[int, int]]] = []
        self.scheduled = False

    def _install(self) -> None:
        alloc = self.alloc
        self.hints = [[] for _ in alloc.zones]
        alloc.notify_free = self._notify
        alloc.notify_order = self.order
        for pfn in alloc.heads(PG_BUDDY).tolist():
            if alloc._od[pfn] >= self.order:
                self._notify(alloc.zone_of(pfn), pfn, alloc._od[pfn])

    def _notify(self, zone: int, pfn: int, order: int) -> None:
        c = self.counters
        c.hints += 1
        hints = self.hints[zone]
        if len(hints) >= self.buffer:
            c.hints_lost += 1
            return
        hints.append((pfn, order))
        if not self.scheduled:
            self.scheduled = True
            self.clock.schedule(PAGE_REPORTING_DELAY, self._process, PRIO_ENGINE)

    def _process(self) -> None:
        self._run(self._pass())

    def _pass(self) -> PassSteps:
        alloc = self.alloc
        c = self.counters
        c.passes += 1
        fl = alloc._fl
        od = alloc._od
        for zone in range(len(alloc.zones)):
            hints, self.hints[zone] = self.hints[zone], []
            batch: list[tuple[int, int, int]] = []
            taken: set[int] = set()
            for pfn, _order in hints:
                c.visited += 1
                c.visited_locked += 1
                c.lock_acquisitions += 1
                head = alloc.free_block_containing(pfn)
                if head < 0 or od[head] < self.order:
                    c.hints_lost += 1
                    continue
                if fl[head] & PG_REPORTED or head in taken:
                    continue  # already reported, or a duplicate hint for a merged block
                old_mt = alloc.migratetype_of(head)
                if old_mt == MIGRATE_ISOLATE:
                    continue
                if alloc.zone_free[zone] <= alloc.zones[zone].wmark_min + (1 << od[head]):
                    c.isolate_failures += 1
                    continue
                order = od[head]
                self._set_isolate(head, order, MIGRATE_ISOLATE)
                taken.add(head)
                batch.append((head, order, old_mt))
                if len(batch) == self.capacity:
                    yield from self._flush(batch)
            if batch:
                yield from self._flush(batch)
        # Hints captured while device calls were in flight start the next pass.
        self.scheduled = False
        if any(self.hints):
            self.scheduled = True
            self.clock.schedule(PAGE_REPORTING_DELAY, self._process, PRIO_ENGINE)

    def _set_isolate(self, head: int, order: int, mt: int) -> None:
        alloc = self.alloc
        start = head & ~(pageblock_nr_pages - 1)
        if order > pageblock_order:
            alloc.move_freepages_block(start, mt)
            return
        moved = alloc.move_freepages_block(start, mt)
        self.counters.visited_locked += moved >> self.order

    def _flush(self, batch: list[tuple[int, int, int]]) -> PassSteps:
        yield self._report([(pfn, order) for pfn, order, _ in batch])
        alloc = self.alloc
        fl = alloc._fl
        od = alloc._od
        for pfn, order, old_mt in batch:
            self.counters.lock_acquisitions += 1
            if order >= pageblock_order:
                # Un-isolate by freeing the block again so it can merge with its neighbours.
                zone = alloc.zone_of(pfn)
                alloc._del(pfn, zone, order, MIGRATE_ISOLATE)
                first = pfn >> pageblock_order
                for pb in range(first, first + (1 << (order - pageblock_order))):
                    alloc._pbmt[pb] = old_mt
                alloc._free_one(pfn, order, zone, 3)  # FPI_TO_TAIL | SKIP_NOTIFY, as old_mt
            else:
                alloc.move_freepages_block(pfn, old_mt)
            if fl[pfn] & PG_BUDDY and od[pfn] == order:
                alloc.set_reported(pfn)
        batch.clear()
