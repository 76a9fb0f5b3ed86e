"""``cmma``: s390 guest page hinting ("[S390] guest page hinting light", 2008).

The guest keeps a state per page in a table the host can read: arch_free_page() marks a freed
block unused and arch_alloc_page() marks an allocated one stable again, each with one store
(the ESSA instruction), never an exit. The host discards unused pages when it scans, here every
``scan_interval`` seconds (it scans when it reclaims; an idle host never would), and the
guest's next allocation of a discarded page refaults it. Every order is hinted, blocks on the
per-CPU lists included, so the host discards 4 KiB pages and its THP backing is split.
Nothing is isolated and nothing waits: a page reallocated before the scan is simply stable.
"""

from __future__ import annotations

from ..clock import PRIO_HOST
from ..constants import PG_FREE_MASK
from ..host import PRESENT
from .base import Engine


class CmmaEngine(Engine):
    name = "cmma"
    description = "s390 page states: a store per free and allocation, host discards on its scan"

    default_capacity = 1
    discards_whole_blocks = False

    def __init__(
        self, order: int = 0, capacity: int | None = None, scan_interval: float = 1.0
    ) -> None:
        super().__init__(0, 1)
        self.scan_interval = scan_interval
        self.host_state: bytearray | None = None

    def _install(self) -> None:
        self.alloc.free_hook = self._mark_unused
        self.clock.schedule(self.scan_interval, self._host_scan, PRIO_HOST)

    def bind_host(self, state: bytearray) -> None:
        """The host's backing state, so a scan skips pages it discarded already."""
        self.host_state = state

    def _mark_unused(self, pfn: int, order: int) -> None:
        self.counters.hints += 1  # one state store per freed block

    def note_allocation(self, failed: bool) -> None:
        if not failed:
            self.counters.hints += 1  # set_page_stable(): one store

    def _host_scan(self) -> None:
        c = self.counters
        c.passes += 1
        alloc = self.alloc
        heads = alloc.heads(PG_FREE_MASK).tolist()
        c.visited += len(heads)  # the host's scan, not guest time
        state = self.host_state
        od = alloc._od
        batch = [
            (pfn, od[pfn])
            for pfn in heads
            if state is None or state.count(PRESENT, pfn, pfn + (1 << od[pfn]))
        ]
        if batch and self._sink is not None:
            c.blocks_reported += len(batch)
            c.pages_reported += sum(1 << order for _, order in batch)
            self._sink(batch)
        self.clock.schedule(self.scan_interval, self._host_scan, PRIO_HOST)
