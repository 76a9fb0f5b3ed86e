"""``perpage``: a hint for every freed block, from arch_free_page().

Every free, of any order and before the block reaches a per-CPU list, sends one hint to the host
(a host exit each). The host acts on hints ``host_latency`` seconds later; a block the guest has
allocated again by then is skipped (its state was set back to stable, as s390's CMMA does) and
counted as reallocated before the host saw it. Hinted blocks that the host did discard sit free
in the guest, often on per-CPU lists, and their next allocation refaults: the cost the thread
attributed to this approach. The reporting order does not apply; every order is hinted.
"""

from __future__ import annotations

from ..clock import PRIO_HOST
from ..constants import PG_BUDDY, PG_PCP
from .base import Engine


class PerPageEngine(Engine):
    name = "perpage"
    description = "hint on every free (arch_free_page); host acts a little later"

    default_capacity = 1  # one hint, one exit

    def __init__(
        self, order: int = 0, capacity: int | None = None, host_latency: float = 0.001
    ) -> None:
        super().__init__(0, 1)
        self.host_latency = host_latency
        self.pending: list[tuple[int, int]] = []

    def _install(self) -> None:
        self.alloc.free_hook = self._hint

    def _hint(self, pfn: int, order: int) -> None:
        self.counters.hints += 1
        if not self.pending:
            self.clock.schedule(self.host_latency, self._host_processes, PRIO_HOST)
        self.pending.append((pfn, order))

    def _host_processes(self) -> None:
        alloc = self.alloc
        c = self.counters
        c.passes += 1
        fl = alloc._fl
        od = alloc._od
        pending, self.pending = self.pending, []
        for pfn, order in pending:
            c.visited += 1
            head = alloc.owner_of(pfn)
            if (
                head < 0
                or not fl[head] & (PG_BUDDY | PG_PCP)
                or head + (1 << od[head]) < pfn + (1 << order)
            ):
                c.reallocated_before_host += 1
                continue
            self._report([(pfn, order)])
            self.in_flight = 0  # the host acts on its own time; nothing in the guest waits
