"""Memory pressure in the simulated guest: what a balloon squeezed below the working set does.

The allocator model refuses an allocation once its free lists and the page cache are spent.
A real kernel goes on from there, and this module plays that part for the workload's
allocations, in the kernel's order:

1. **Alloc stall**: the allocation entered direct reclaim and the cache could not cover it
   (``ALLOCSTALL``).
2. **Swap out**: while the swap device has room, reclaim writes some of the workload's
   anonymous memory to swap to make room for the allocation (``PSWPOUT``). The pages the
   workload asked for are then its own, but part of what it owns lives in swap: the model
   keeps that as a count (``swapped``), not as frames.
3. **Swap in**: a workload with pages in swap keeps touching them: each second a share of them
   (``TOUCH_RATE``) is faulted back in (``PSWPIN`` and ``PGMAJFAULT``), pushing as many others
   out. Once the guest has free memory again (the balloon let go), swapped pages come back into
   real frames, held here for the workload (``held``).
4. **OOM**: with swap full, ``out_of_memory()`` runs. With deflate-on-oom the balloon driver's
   OOM notifier gives ``OOM_DEFLATE_PAGES`` back first and the allocation is retried; only
   when that frees nothing is a task killed (``OOM_KILL``). The victim is the workload's memory
   this module accounts for (what is in swap and the frames it came back into); the workload
   goes on, as a service its supervisor restarts would.

When the workload frees memory it frees its swapped and swapped-in pages in proportion, as
``munmap`` of a partly swapped region does.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.model import Simulation
from daemon.model.constants import MIGRATE_MOVABLE, PAGE_ALLOC_COSTLY_ORDER

#: Swap device size when the guest has no other: an eighth of RAM, a common small swap file.
SWAP_FRACTION = 0.125
#: Share of the swapped-out working set touched (and so swapped in) per second.
TOUCH_RATE = 0.05
#: Pages the virtio_balloon OOM notifier releases per call (``oom_pages``, Linux default 256).
OOM_DEFLATE_PAGES = 256
#: Pages swapped back in per second at most once there is free memory again.
SWAPIN_PAGES_PER_SECOND = 25_600  # 100 MiB/s: a virtual disk


@dataclass(frozen=True)
class PressureCounters:
    """The guest kernel's vm events of pressure, cumulative since boot (pages and counts)."""

    pswpin: int
    pswpout: int
    pgmajfault: int  # major faults from swap-ins only (the workloads count their own)
    allocstall: int
    oom_kill: int
    oom_deflated_pages: int  # pages the OOM notifier took back out of the balloon
    swapped_pages: int  # of the workload's memory, in swap now
    swap_pages: int  # the swap device's size


class GuestPressure:
    """The kernel's reaction to allocations the allocator model refuses, for ``sim``.

    It takes over ``sim.alloc_pages`` (what the workloads call); the balloon driver allocates
    through the allocator directly and never feels it, as in Linux where balloon allocations
    use ``__GFP_NORETRY`` and fail quietly.
    """

    def __init__(self, sim: Simulation, *, swap_pages: int, deflate_on_oom: bool) -> None:
        self.sim = sim
        self.swap_pages = swap_pages
        self.deflate_on_oom = deflate_on_oom
        self._alloc = sim.alloc_pages
        sim.alloc_pages = self.alloc_pages  # type: ignore[method-assign]
        self.swapped = 0
        self.held: list[int] = []
        self.pswpin = 0
        self.pswpout = 0
        self.majfault = 0
        self.allocstall = 0
        self.oom_kill = 0
        self.oom_deflated = 0
        self._touch_debt = 0.0
        self._base = self._anon_pages() - len(self.held)
        self._own_before = 0

    def counters(self) -> PressureCounters:
        return PressureCounters(
            pswpin=self.pswpin,
            pswpout=self.pswpout,
            pgmajfault=self.majfault,
            allocstall=self.allocstall,
            oom_kill=self.oom_kill,
            oom_deflated_pages=self.oom_deflated,
            swapped_pages=self.swapped,
            swap_pages=self.swap_pages,
        )

    def alloc_pages(self, order: int, mt: int = MIGRATE_MOVABLE, cpu: int = 0) -> int:
        """``sim.alloc_pages`` with the kernel's reaction when the allocator says no."""
        pfn = self._alloc(order, mt, cpu)
        need = 1 << order
        if pfn >= 0 or (order > PAGE_ALLOC_COSTLY_ORDER and self._room() >= need):
            # A large block that fragmentation denies is no shortage: Linux compacts, never
            # OOM-kills for it, and a THP falls back to small pages.
            return pfn
        self.allocstall += 1
        if self.swapped + need <= self.swap_pages:
            # Reclaim swapped part of the working set out to make room: the workload has the
            # memory it asked for, only not all of it in RAM.
            self.swapped += need
            self.pswpout += need
            return -1
        balloon = self.sim.balloon
        if self.deflate_on_oom and len(balloon):
            self.oom_deflated += len(balloon.deflate(OOM_DEFLATE_PAGES))
            return self._alloc(order, mt, cpu)
        self._kill()
        return -1

    def advance(self, seconds: float) -> None:
        """After ``seconds`` of guest time: the workload's frees release its swapped share;
        swapped pages it touches are swapped in (thrashing while memory is short, into free
        frames once there are some)."""
        self._follow_frees()
        if self.swapped == 0 or seconds <= 0:
            return
        room = self._room()
        back = min(self.swapped, room, int(SWAPIN_PAGES_PER_SECOND * seconds) or 1)
        for _ in range(back):
            pfn = self._alloc(0, MIGRATE_MOVABLE, 0)
            if pfn < 0:
                break
            self.held.append(pfn)
            self.swapped -= 1
            self.pswpin += 1
            self.majfault += 1
        # What stays in swap is touched all the same: each such fault pushes another page out.
        self._touch_debt += self.swapped * TOUCH_RATE * seconds
        thrash = int(self._touch_debt)
        self._touch_debt -= thrash
        self.pswpin += thrash
        self.pswpout += thrash
        self.majfault += thrash
        self._own_before = self._own()

    def _room(self) -> int:
        """Free pages above the high watermarks: what swap-in may use without new reclaim."""
        alloc = self.sim.alloc
        high = sum(z.wmark_high for z in alloc.zones)
        return max(0, sum(alloc.zone_free) - 2 * high)

    def _anon_pages(self) -> int:
        sim = self.sim
        return sim.alloc.allocated_pages - len(sim.balloon) - len(sim.cache)

    def _own(self) -> int:
        """The workload's pages in frames it allocated itself."""
        return max(0, self._anon_pages() - len(self.held) - self._base)

    def _follow_frees(self) -> None:
        own = self._own()
        before, self._own_before = self._own_before, own
        if own >= before or before == 0 or not (self.swapped or self.held):
            return
        share = (before - own) / before
        swapped_free = round(self.swapped * share)
        self.swapped -= swapped_free
        self._release(round(len(self.held) * share))

    def _release(self, n: int) -> None:
        free = self.sim.free_pages
        for _ in range(min(n, len(self.held))):
            free(self.held.pop(), 0)

    def _kill(self) -> None:
        self.oom_kill += 1
        self.swapped = 0
        self._release(len(self.held))
        self._own_before = self._own()
