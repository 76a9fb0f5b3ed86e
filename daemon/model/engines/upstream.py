"""``upstream``: mm/page_reporting.c as merged in 5.7 and kept through 6.x.

Mapping to the kernel, function by function:

* ``_notify`` is page_reporting_notify_free(): the allocator calls it at the end of
  __free_one_page() when the final order is >= page_reporting_order.
* ``_request`` is __page_reporting_request(): IDLE -> REQUESTED schedules the worker after
  PAGE_REPORTING_DELAY; registration requests once.
* ``_process`` is page_reporting_process(): ACTIVE for the pass, every zone, then IDLE unless
  something set REQUESTED again (the budget), in which case it runs again 2 s later.
* ``_process_zone`` is page_reporting_process_zone(): the watermark gate
  (low + CAPACITY << order), every order from page_reporting_order up and every migratetype but
  isolate, one scatterlist shared across lists (mixed batches), leftovers reported at the end.
* ``_cycle`` is page_reporting_cycle(): budget DIV_ROUND_UP(nr_free, CAPACITY * 16), walk from
  the head skipping PageReported, isolate into the batch, rotate the list at the first
  unprocessed page before dropping the lock to report, drain, restart at the (new) head.
* a device call takes ``OpCosts.report()`` of simulated time (the round trip and the host's
  discards); the pass waits it out with the lock dropped and the batch isolated, as the kernel
  waits in wait_for_completion(), while the guest keeps allocating around it.
* ``_drain`` is page_reporting_drain(): put each page back to the tail without a notification,
  flag it Reported only if it did not merge; walked in scatterlist order (last isolated first).
"""

from __future__ import annotations

from ..buddy import BuddyAllocator
from ..clock import PRIO_ENGINE
from ..constants import (
    MIGRATE_ISOLATE,
    MIGRATE_TYPES,
    NR_PAGE_ORDERS,
    PAGE_REPORTING_DELAY,
    PG_BUDDY,
    PG_REPORTED,
)
from .base import Engine, PassSteps

PAGE_REPORTING_IDLE = 0
PAGE_REPORTING_REQUESTED = 1
PAGE_REPORTING_ACTIVE = 2


class UpstreamEngine(Engine):
    name = "upstream"
    description = "5.7+ page_reporting: 2 s delay, capacity 32, budget, list rotation"

    def __init__(self, order: int = 9, capacity: int | None = None) -> None:
        super().__init__(order, capacity)
        self.state = PAGE_REPORTING_IDLE
        self.batch: list[tuple[int, int]] = []

    def _install(self) -> None:
        self.alloc.notify_free = self._notify
        self.alloc.notify_order = self.order
        self._request()

    def _notify(self, zone: int, pfn: int, order: int) -> None:
        self._request()

    def _request(self) -> None:
        if self.state == PAGE_REPORTING_REQUESTED:
            return
        old, self.state = self.state, PAGE_REPORTING_REQUESTED
        if old != PAGE_REPORTING_IDLE:
            return
        self.clock.schedule(PAGE_REPORTING_DELAY, self._process, PRIO_ENGINE)

    def _process(self) -> None:
        self._run(self._pass())

    def _pass(self) -> PassSteps:
        self.state = PAGE_REPORTING_ACTIVE
        self.counters.passes += 1
        for zone in range(len(self.alloc.zones)):
            yield from self._process_zone(zone)
        if self.state == PAGE_REPORTING_REQUESTED:
            self.clock.schedule(PAGE_REPORTING_DELAY, self._process, PRIO_ENGINE)
        else:
            self.state = PAGE_REPORTING_IDLE

    def _process_zone(self, zone: int) -> PassSteps:
        alloc = self.alloc
        z = alloc.zones[zone]
        watermark = z.wmark_low + (self.capacity << self.order)
        if not alloc._watermark_ok(zone, 0, watermark, 0):
            return
        batch = self.batch
        for order in range(self.order, NR_PAGE_ORDERS):
            for mt in range(MIGRATE_TYPES):
                if mt == MIGRATE_ISOLATE:
                    continue
                yield from self._cycle(zone, order, mt, batch)
        if batch:
            yield self._report(batch)
            self.counters.lock_acquisitions += 1
            self._drain(batch)

    def _cycle(self, zone: int, order: int, mt: int, batch: list[tuple[int, int]]) -> PassSteps:
        alloc = self.alloc
        c = self.counters
        s = alloc.sentinel(zone, order, mt)
        nx = alloc._nx
        fl = alloc._fl
        if nx[s] == s:
            return
        c.lock_acquisitions += 1
        nr_free = alloc.nr_free[zone * NR_PAGE_ORDERS + order]
        budget = -(-nr_free // (self.capacity * 16))
        capacity = self.capacity
        page = nx[s]
        nxt = s
        while page != s:
            nxt = nx[page]
            c.visited += 1
            c.visited_locked += 1
            if fl[page] & PG_REPORTED:
                page = nxt
                continue
            if budget < 0:
                self.state = PAGE_REPORTING_REQUESTED
                nxt = page
                break
            if len(batch) < capacity:
                if not alloc.isolate_free_page(page, order):
                    c.isolate_failures += 1
                    nxt = page
                    break
                batch.append((page, order))
                page = nxt
                continue
            # Batch full: make this page the head, drop the lock, report, retake, drain.
            if nx[s] != page:
                rotate_to_front(alloc, s, page)
            yield self._report(batch)  # the zone lock is dropped meanwhile
            budget -= 1
            c.lock_acquisitions += 1
            self._drain(batch)
            page = nxt = nx[s]
        if nxt != s and nx[s] != nxt:
            rotate_to_front(alloc, s, nxt)

    def _drain(self, batch: list[tuple[int, int]]) -> None:
        alloc = self.alloc
        fl = alloc._fl
        od = alloc._od
        for pfn, order in reversed(batch):
            head = alloc.putback_isolated_page(pfn, order)
            if head == pfn and fl[pfn] & PG_BUDDY and od[pfn] == order:
                alloc.set_reported(pfn)
        batch.clear()


def rotate_to_front(alloc: BuddyAllocator, sentinel: int, page: int) -> None:
    """list_rotate_to_front(): move the list head so ``page`` is first; O(1)."""
    nx = alloc._nx
    pv = alloc._pv
    p = pv[sentinel]
    n = nx[sentinel]
    nx[p] = n
    pv[n] = p
    q = pv[page]
    nx[q] = sentinel
    pv[sentinel] = q
    nx[sentinel] = page
    pv[page] = sentinel
