"""The simulated guest kernel: the allocator model with a workload, reporting and a balloon
driver, made real in guest RAM.

What reaches host memory, and how (matching what QEMU does for the real thing):

- The kernel's boot reservations (firmware, kernel image, memmap) are written at boot.
- Every block the workload allocates is written: the guest touched it, so the host backs it.
- Every block the reporting engine reports is discarded (QEMU's ``virtio_balloon_handle_report``
  calls ``ram_block_discard_range``), and so is every page the balloon driver inflates with.
- Deflated balloon pages are left alone; the host backs them again when the guest next
  writes them.

Changes are applied per step from the model's log, checking each page against the model's host
state at the end of the step, so a page allocated, freed and reported within one step (or
reported and then reused) ends up exactly as the host would have it.

Guest statistics are the ones a Linux 6.1 virtio_balloon driver sends (``update_balloon_stats``):
the ten tags QEMU 7.2 knows, HugeTLB counters zero.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from daemon.guest_stats import GuestStats
from daemon.model import MAX_PAGE_ORDER, WORKLOADS, SimConfig, SimLog, Simulation, make_workload
from daemon.model.constants import PAGE_SIZE, PG_FREE_MASK, PG_REPORTED, PG_RESERVED
from daemon.model.host import BALLOONED, PRESENT
from daemon.simguest.agent import REPORTING_ORDER_FILE, buddyinfo, meminfo
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.pressure import SWAP_FRACTION, GuestPressure
from daemon.simguest.ram import GuestRAM
from daemon.simguest.truth import PageStates

# page_reporting_order before any reporting device registers (6.1): nothing is reportable.
NO_REPORTING_ORDER = MAX_PAGE_ORDER + 1
SIMULATED_WORKLOADS = tuple(WORKLOADS)


def block_pages(
    blocks: list[tuple[int, int]] | list[tuple[int, int, float]],
) -> npt.NDArray[np.int64]:
    """Page numbers covered by (pfn, order, ...) blocks, as one array."""
    if not blocks:
        return np.empty(0, dtype=np.int64)
    arr = np.array([b[:2] for b in blocks], dtype=np.int64)
    pfns, orders = arr[:, 0], arr[:, 1]
    parts = [pfns[orders == 0]]
    for order in np.unique(orders[orders > 0]).tolist():
        heads = pfns[orders == order]
        parts.append((heads[:, None] + np.arange(1 << order, dtype=np.int64)).ravel())
    return np.concatenate(parts)


class ModelGuestOS:
    """A guest kernel booted in ``ram`` from ``spec`` (workload, seed, reporting engine)."""

    def __init__(self, spec: SimGuestSpec, ram: GuestRAM) -> None:
        workload = spec.workload
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
        order = spec.page_reporting_order if spec.page_reporting_order is not None else 9
        config = SimConfig(
            ram_bytes=spec.ram_bytes,
            engine=spec.engine if spec.free_page_reporting else None,
            order=order,
            seed=spec.seed,
            keep_log=True,
        )
        if config.total_pages * PAGE_SIZE != ram.size:
            raise ValueError("guest RAM must be a multiple of 4 MiB (MAX_PAGE_ORDER blocks)")
        self._ram = ram
        self._deflate_on_oom = spec.deflate_on_oom
        self._new_stats = spec.linux_6_12_stats
        self.sim = Simulation(config, make_workload(workload))
        swap = spec.swap_bytes if spec.swap_bytes is not None else spec.ram_bytes * SWAP_FRACTION
        self.pressure = GuestPressure(
            self.sim, swap_pages=int(swap) // PAGE_SIZE, deflate_on_oom=spec.deflate_on_oom
        )
        self._target_pages = 0  # the balloon target the driver last saw
        self._oom_deflated = 0  # the OOM notifier's deflations the driver has seen
        self.reporting_order = order if spec.free_page_reporting else NO_REPORTING_ORDER
        # The kernel writes its own reservations (image, memmap) while it boots.
        ram.write(self.sim.alloc.heads(PG_RESERVED).astype(np.int64))
        self._apply(self.sim.drain_log())

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self.sim.advance_to(self.sim.now + seconds)
            self.pressure.advance(seconds)
        self._apply(self.sim.drain_log())

    def _apply(self, log: SimLog) -> None:
        host = self.sim.host.state_arr
        if log.allocated:
            pages = block_pages(log.allocated)
            self._ram.write(pages[host[pages] == PRESENT])
        if log.reported:
            pages = block_pages(log.reported)
            self._ram.discard(pages[host[pages] != PRESENT])

    def balloon_toward(self, target_pages: int, max_pages: int) -> int:
        balloon = self.sim.balloon
        have = len(balloon)
        if self.pressure.oom_deflated != self._oom_deflated:
            # The OOM notifier let pages go: the driver inflates again only when the host
            # sets a new target (a config change), as virtio_balloon does.
            if target_pages == self._target_pages:
                return have
            self._oom_deflated = self.pressure.oom_deflated
        self._target_pages = target_pages
        if target_pages > have:
            taken = balloon.inflate(min(max_pages, target_pages - have))
            self._ram.discard(np.array(taken, dtype=np.int64))
        elif target_pages < have:
            balloon.deflate(min(max_pages, have - target_pages))
        return len(balloon)

    def stats(self) -> GuestStats:
        """What ``update_balloon_stats()`` sends: the kernel's counters, pages in bytes."""
        info = self.sim.meminfo()
        pressure = self.pressure.counters()
        total = info.total_pages
        if self._deflate_on_oom:
            # With deflate-on-oom the driver leaves totalram alone (adjust_managed_page_count
            # is skipped), so ballooned pages still count in MemTotal.
            total += len(self.sim.balloon)
        return GuestStats(
            swap_in_bytes=(info.pswpin + pressure.pswpin) * PAGE_SIZE,
            swap_out_bytes=(info.pswpout + pressure.pswpout) * PAGE_SIZE,
            major_faults=info.pgmajfault + pressure.pgmajfault,
            minor_faults=info.pgfault + pressure.pgmajfault,
            free_bytes=info.free_pages * PAGE_SIZE,
            total_bytes=total * PAGE_SIZE,
            available_bytes=info.available_pages * PAGE_SIZE,
            disk_caches_bytes=info.file_pages * PAGE_SIZE,
            hugetlb_allocations=0,
            hugetlb_failures=0,
            # Linux 6.12's counters, where the guest's kernel sends them.
            oom_kills=pressure.oom_kill if self._new_stats else None,
            alloc_stalls=pressure.allocstall if self._new_stats else None,
        )

    def page_states(self) -> PageStates:
        alloc = self.sim.alloc
        n = alloc.total_pages
        free_heads = alloc.heads(PG_FREE_MASK)
        free = alloc.expand_blocks(free_heads)
        free_order = np.full(n, -1, dtype=np.int8)
        head_orders = alloc.order_arr[free_heads]
        for order in np.unique(head_orders).tolist():
            heads = free_heads[head_orders == order]
            free_order[(heads[:, None] + np.arange(1 << order)).ravel()] = order
        ballooned = np.zeros(n, dtype=bool)
        ballooned[np.array(self.sim.balloon.pages, dtype=np.int64)] = True
        cache = np.zeros(n, dtype=bool)
        cache[np.array(self.sim.cache.lru, dtype=np.int64)] = True
        return PageStates(
            free=free,
            used=~free & ~ballooned,
            ballooned=ballooned,
            reported=alloc.expand_blocks(alloc.heads(PG_REPORTED)),
            cache=cache,
            resident=self._ram.backed.copy(),
            touched=self._ram.touched.copy(),
            deflated=free & (self.sim.host.state_arr == BALLOONED),
            free_order=free_order,
            buddy_by_order=tuple(int(n) for n in alloc.free_pages_by_order()),
        )

    def proc_file(self, path: str) -> str | None:
        """A file of the guest's, as its agent reads it; None where there is no such file."""
        if path == "/proc/buddyinfo":
            return buddyinfo(self.sim.alloc)
        if path == "/proc/meminfo":
            return meminfo(self.sim.meminfo())
        if path == REPORTING_ORDER_FILE:
            return f"{self.reporting_order}\n"
        return None
