"""``boundary`` and ``naive``: the v10 "unused page reporting" design and its counterfactual.

v10 (Sept 2019, the seed thread) keeps reported pages as one run at the tail of each free list
and a per-list ``reported_boundary`` pointing at the first of them:

* get_unreported_page() starts just in front of the boundary and walks towards the head,
  skipping Reported pages (moving the boundary over them) and isolating the first unreported
  page it finds;
* free_reported_page() puts a reported page back in front of the boundary and flags it if it
  did not merge, so the run of reported pages grows towards the head;
* add_to_free_list_tail() inserts in front of the boundary, never behind it (the allocator
  does this for every list through ``BuddyAllocator.boundary``);
* removing the page at the boundary pushes the boundary to the next entry (``_del``), also when
  move_freepages_block() moves it to another type's list; v10 reset a single boundary only
  for compaction (page_reporting_free_area_release()), which the model does not have;
* the first fill of a zone pass sets ZONE_PAGE_REPORTING_ACTIVE and resets all of the zone's
  boundaries to the list_head; running out of pages clears the bit (__page_reporting_cancel()),
  so every pass starts by walking back over the reported run at the tail of each list;
* notification: nr_free(order) >= reported pages of that order + PAGE_REPORTING_HWM (32), once
  per zone until the zone's pass ends; the worker runs HZ / 10 later and reports the zone until
  no unreported page is left (no budget yet, that came in v16);
* a device call carries at most 16 blocks: v10's virtio_balloon capped the reporting queue at
  min(vring size, VIRTIO_BALLOON_VRING_HINTS_MAX = 16); the merged series made it 32.

``naive`` is the same code with the boundary never kept: every search starts again from the
list_head (the kernel's name for the sentinel), that is from the tail, and walks back over every
reported page. That is the rewalk the boundary was invented to avoid: O(n) per page found.
"""

from __future__ import annotations

from ..clock import PRIO_ENGINE
from ..constants import (
    MAX_PAGE_ORDER,
    MIGRATE_ISOLATE,
    MIGRATE_TYPES,
    NR_PAGE_ORDERS,
    PAGE_REPORTING_HWM,
    PAGE_REPORTING_V10_DELAY,
    PG_BUDDY,
    PG_REPORTED,
    VIRTIO_BALLOON_VRING_HINTS_MAX,
)
from .base import Engine, PassSteps


class BoundaryEngine(Engine):
    name = "boundary"
    description = "v10 reported_boundary: resume each search at the boundary"

    keep_boundary = True

    # v10's device took min(vring size, VIRTIO_BALLOON_VRING_HINTS_MAX) blocks per call.
    default_capacity = VIRTIO_BALLOON_VRING_HINTS_MAX

    def __init__(
        self,
        order: int = 9,
        capacity: int | None = None,
        worker_delay: float = PAGE_REPORTING_V10_DELAY,
    ) -> None:
        super().__init__(order, capacity)
        self.worker_delay = worker_delay  # HZ / 10 in v10; varied to show what it costs
        self.requested: list[bool] = []
        self.active: list[bool] = []
        self.refcnt = 0
        self.batch: list[tuple[int, int]] = []
        # Where the walking goes (not kernel state): zone passes that set
        # ZONE_PAGE_REPORTING_ACTIVE, each resetting the zone's boundaries, and the Reported
        # entries skipped by searches that began at a list_head, that is the walks back over
        # reported runs which a reset (or, for naive, every search) causes.
        self.activations = 0
        self.rewalked = 0

    def _install(self) -> None:
        alloc = self.alloc
        nz = len(alloc.zones)
        self.requested = [False] * nz
        self.active = [False] * nz
        alloc.notify_free = self._notify
        alloc.notify_order = self.order
        for zone in range(nz):
            self._request(zone)

    def _notify(self, zone: int, pfn: int, order: int) -> None:
        if self.requested[zone]:
            return
        idx = zone * NR_PAGE_ORDERS + order
        if self.alloc.nr_free[idx] < self.alloc.nr_reported[idx] + PAGE_REPORTING_HWM:
            return
        self._request(zone)

    def _request(self, zone: int) -> None:
        self.requested[zone] = True
        self.refcnt += 1
        if self.refcnt == 1:
            self.clock.schedule(self.worker_delay, self._process, PRIO_ENGINE)

    def _process(self) -> None:
        self._run(self._pass())

    def _pass(self) -> PassSteps:
        self.counters.passes += 1
        nz = len(self.alloc.zones)
        zone = 0
        while self.refcnt:
            if self.requested[zone]:
                yield from self._cycle(zone)
            zone = (zone + 1) % nz

    def _cycle(self, zone: int) -> PassSteps:
        c = self.counters
        c.lock_acquisitions += 1
        batch = self.batch
        while True:
            if not self._fill(zone, batch):
                break
            yield self._report(batch)
            c.lock_acquisitions += 1
            self._drain(batch)
            if not self.requested[zone]:
                break

    def _fill(self, zone: int, batch: list[tuple[int, int]]) -> int:
        if not self.active[zone]:
            self.active[zone] = True
            self.activations += 1
            self._reset_all_boundaries(zone)
        for order in range(MAX_PAGE_ORDER, self.order - 1, -1):
            for mt in range(MIGRATE_TYPES - 1, -1, -1):
                if mt == MIGRATE_ISOLATE:
                    continue
                while True:
                    page = self._get_unreported_page(zone, order, mt)
                    if page < 0:
                        break
                    batch.append((page, order))
                    if len(batch) == self.capacity:
                        return len(batch)
        # Out of pages: the zone is done, boundaries are off until the next request.
        self.active[zone] = False
        self._reset_all_boundaries(zone)
        self.requested[zone] = False
        self.refcnt -= 1
        return len(batch)

    def _get_unreported_page(self, zone: int, order: int, mt: int) -> int:
        alloc = self.alloc
        c = self.counters
        lid = alloc.list_id(zone, order, mt)
        s = alloc.total_pages + lid
        pv = alloc._pv
        fl = alloc._fl
        boundary = alloc.boundary
        from_head = boundary[lid] == s
        page = pv[boundary[lid]]
        tail = -1
        found = -1
        skipped = 0
        while page != s:
            c.visited += 1
            c.visited_locked += 1
            if fl[page] & PG_REPORTED:
                tail = page
                page = pv[page]
                skipped += 1
                continue
            if alloc.isolate_free_page(page, order):
                found = page
            else:
                c.isolate_failures += 1
            break
        if from_head:
            self.rewalked += skipped
        if tail >= 0 and self.keep_boundary:
            boundary[lid] = tail
        return found

    def _drain(self, batch: list[tuple[int, int]]) -> None:
        alloc = self.alloc
        fl = alloc._fl
        od = alloc._od
        for pfn, order in batch:
            head = alloc.putback_isolated_page(pfn, order)
            if head == pfn and fl[pfn] & PG_BUDDY and od[pfn] == order:
                alloc.set_reported(pfn)
        batch.clear()

    def _reset_all_boundaries(self, zone: int) -> None:
        alloc = self.alloc
        first = alloc.list_id(zone, 0, 0)
        for lid in range(first, first + NR_PAGE_ORDERS * MIGRATE_TYPES):
            alloc.boundary[lid] = alloc.total_pages + lid


class NaiveEngine(BoundaryEngine):
    name = "naive"
    description = "v10 without the boundary: every search rewalks the reported run"

    keep_boundary = False
