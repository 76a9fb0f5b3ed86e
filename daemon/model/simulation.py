"""A whole simulated guest: allocator, one reporting engine, the host, a workload, a balloon.

``Simulation`` is the façade that the simulated guest process and the benchmarks drive. Time
only moves through ``advance_to``/``run``; everything that happens is recorded in counters,
optional callbacks and a drainable ``SimLog``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .buddy import BuddyAllocator
from .clock import PRIO_SAMPLE, SimClock
from .constants import (
    MAX_PAGE_ORDER,
    MIGRATE_MOVABLE,
    PAGE_SHIFT,
    PG_ALLOC,
    PG_FREE_MASK,
    PG_REPORTED,
    pageblock_order,
)
from .costs import OpCosts
from .engines import Engine, make_engine
from .host import BALLOONED, REPORTED, Host
from .pagecache import PageCache
from .stats import MemInfo, meminfo

BlockCallback = Callable[[int, int], None]  # (pfn, order)
ReportCallback = Callable[[int, int, float], None]  # (pfn, order, time)

# Ground truth per page (``Simulation.page_states``)
PAGE_USED = 0
PAGE_FREE = 1  # free in the guest, still backed by the host
PAGE_REPORTED = 2  # free in the guest and discarded by the host
PAGE_BALLOONED = 3  # held by the balloon


class Workload(Protocol):
    @property
    def name(self) -> str: ...

    def start(self, sim: Simulation) -> None: ...


@dataclass
class SimConfig:
    """What to simulate. Sizes are bytes; the RAM is rounded down to a multiple of 4 MiB."""

    ram_bytes: int
    engine: str | None = "upstream"  # None: no reporting device
    order: int = pageblock_order  # page_reporting_order
    capacity: int | None = None  # blocks per device call; None: the engine's own
    costs: OpCosts | None = None  # per-operation costs; None (or all zero): atomic passes
    engine_options: dict[str, float] = field(default_factory=dict)  # engine constructor extras
    thp_pcp: bool = True  # pcp lists for THP-sized blocks (5.13+); False: the series' kernels
    ncpus: int = 2
    seed: int = 0
    reserve: bool = True  # firmware, kernel image and memmap, as a real boot reserves
    single_zone: bool = False
    sample_interval: float = 1.0  # seconds between samples of the time series
    keep_log: bool = False  # record allocations, frees and reports for drain_log()

    @property
    def total_pages(self) -> int:
        align = 1 << MAX_PAGE_ORDER
        return (self.ram_bytes >> PAGE_SHIFT) // align * align


@dataclass
class SimLog:
    """Everything recorded since the last drain, in order of occurrence."""

    allocated: list[tuple[int, int]] = field(default_factory=list)  # (pfn, order)
    freed: list[tuple[int, int]] = field(default_factory=list)
    reported: list[tuple[int, int, float]] = field(default_factory=list)  # (pfn, order, time)


@dataclass
class Sample:
    time: float
    reported_bytes: int  # discarded by the host because of reporting, now
    free_bytes: int  # NR_FREE_PAGES
    used_bytes: int


def default_reservations(total_pages: int) -> list[tuple[int, int]]:
    """Firmware (first MiB), a 32 MiB kernel image at 16 MiB, and the memmap at the top.

    The memmap is 64 bytes of struct page per 4 KiB page, which memblock places at the top of
    RAM. Together these are what a real guest's MemTotal is short of its RAM size.
    """
    reserved = [(0, 256)]
    if total_pages >= 16384:
        reserved.append((4096, 4096 + 8192))
    memmap = -(-total_pages // 64)
    reserved.append((total_pages - memmap, total_pages))
    return reserved


class Balloon:
    """virtio_balloon's fill_balloon()/leak_balloon(): order-0 movable pages, last in first out.

    Inflating allocates pages without touching them and hands them to the host; deflating frees
    them back to the guest, and the host backs each again on the guest's first touch. Newer
    kernels can also take pageblock-order pages for the balloon; this model keeps order 0.
    """

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self.pages: list[int] = []

    def __len__(self) -> int:
        return len(self.pages)

    def inflate(self, n: int) -> list[int]:
        """Take up to ``n`` pages; returns the PFNs taken (fewer if memory ran out)."""
        sim = self._sim
        taken: list[int] = []
        for _ in range(n):
            pfn = sim.alloc.alloc_pages(0, MIGRATE_MOVABLE, 0)
            if pfn < 0:
                break
            sim.host.balloon_take(pfn)
            taken.append(pfn)
        self.pages.extend(taken)
        return taken

    def deflate(self, n: int) -> list[int]:
        """Give up to ``n`` pages back to the guest. Returns the PFNs given back."""
        sim = self._sim
        given: list[int] = []
        for _ in range(min(n, len(self.pages))):
            pfn = self.pages.pop()
            sim.free_pages(pfn, 0)
            given.append(pfn)
        return given


class Simulation:
    """A guest running ``workload`` with reporting engine ``config.engine``.

    The workload (and any caller) allocates and frees through ``alloc_pages``/``free_pages`` so
    that the host sees every touch and the log and callbacks see every operation.
    """

    def __init__(self, config: SimConfig, workload: Workload | None = None) -> None:
        self.config = config
        n = config.total_pages
        self.clock = SimClock()
        reserved = default_reservations(n) if config.reserve else []
        self.alloc = BuddyAllocator(
            n,
            ncpus=config.ncpus,
            reserved=reserved,
            single_zone=config.single_zone,
            thp_pcp=config.thp_pcp,
        )
        self.host = Host(n)
        self.cache = PageCache(self.free_pages)
        self.alloc.reclaim_hook = self.cache.reclaim
        self.balloon = Balloon(self)
        self.major_faults = 0
        self.minor_faults = 0
        self.rng = np.random.default_rng(config.seed)
        self.log = SimLog()
        self.on_alloc: list[BlockCallback] = []
        self.on_free: list[BlockCallback] = []
        self.on_report: list[ReportCallback] = []
        self.samples: list[Sample] = []
        self.engine: Engine | None = None
        if config.engine:
            self.engine = make_engine(
                config.engine, config.order, config.capacity, **config.engine_options
            )
            self.engine.attach(self.alloc, self.clock, self._reported, config.costs)
            self.engine.bind_host(self.host.state)
        self.workload = workload
        if workload is not None:
            workload.start(self)
        self._sample()

    @property
    def now(self) -> float:
        return self.clock.now

    # -------------------------------------------------------------- operations

    def alloc_pages(self, order: int, mt: int = MIGRATE_MOVABLE, cpu: int = 0) -> int:
        """Allocate and touch a block, as a user of the memory would. -1 when out of memory."""
        pfn = self.alloc.alloc_pages(order, mt, cpu)
        if self.engine is not None:
            self.engine.note_allocation(pfn < 0)
        if pfn < 0:
            return pfn
        self.host.touch(pfn, order)
        if self.config.keep_log:
            self.log.allocated.append((pfn, order))
        for cb in self.on_alloc:
            cb(pfn, order)
        return pfn

    def free_pages(self, pfn: int, order: int, cpu: int = 0) -> None:
        self.alloc.free_pages(pfn, order, cpu)
        if self.config.keep_log:
            self.log.freed.append((pfn, order))
        for cb in self.on_free:
            cb(pfn, order)

    def _reported(self, batch: list[tuple[int, int]]) -> None:
        now = self.clock.now
        host = self.host
        keep = self.config.keep_log
        for pfn, order in batch:
            host.discard(pfn, order)
            if keep:
                self.log.reported.append((pfn, order, now))
            for cb in self.on_report:
                cb(pfn, order, now)

    # -------------------------------------------------------------- time

    def advance_to(self, t: float) -> None:
        """Run the simulation up to simulated time ``t`` seconds."""
        self.clock.advance_to(t)

    def run(self, seconds: float, progress: Callable[[float], None] | None = None) -> None:
        """Run ``seconds`` more, calling ``progress(fraction)`` once per simulated second."""
        start = self.clock.now
        end = start + seconds
        t = start
        while t < end:
            t = min(t + 1.0, end)
            self.clock.advance_to(t)
            if progress is not None:
                progress((t - start) / seconds if seconds else 1.0)

    def _sample(self) -> None:
        page = 1 << PAGE_SHIFT
        alloc = self.alloc
        self.samples.append(
            Sample(
                time=self.clock.now,
                reported_bytes=self.host.reported_pages * page,
                free_bytes=sum(alloc.zone_free) * page,
                used_bytes=alloc.allocated_pages * page,
            )
        )
        self.clock.schedule(self.config.sample_interval, self._sample, PRIO_SAMPLE)

    # -------------------------------------------------------------- observation

    def drain_log(self) -> SimLog:
        """Return and forget everything logged so far (needs ``keep_log``)."""
        log, self.log = self.log, SimLog()
        return log

    def meminfo(self) -> MemInfo:
        """The guest kernel's memory counters now (what its balloon driver reports from)."""
        return meminfo(
            self.alloc, len(self.cache), len(self.balloon), self.major_faults, self.minor_faults
        )

    def page_states(self) -> npt.NDArray[np.uint8]:
        """Ground truth for every page: PAGE_USED, PAGE_FREE, PAGE_REPORTED or PAGE_BALLOONED.

        A page is REPORTED when it is free in the guest and discarded by the host, whatever the
        guest's PageReported flag says (split halves of a reported block lose the flag).
        """
        alloc = self.alloc
        free = alloc.expand_blocks(alloc.heads(PG_FREE_MASK))
        states = np.full(alloc.total_pages, PAGE_USED, dtype=np.uint8)
        states[free] = PAGE_FREE
        states[free & (self.host.state_arr == REPORTED)] = PAGE_REPORTED
        states[self.host.state_arr == BALLOONED] = PAGE_BALLOONED
        return states

    def reported_flag_pages(self) -> int:
        """Pages in blocks the guest has flagged PageReported."""
        alloc = self.alloc
        heads = alloc.heads(PG_REPORTED)
        return int((1 << alloc.order_arr[heads].astype(np.int64)).sum())

    def used_heads(self) -> npt.NDArray[np.intp]:
        return self.alloc.heads(PG_ALLOC)

    def result(self) -> dict[str, object]:
        """Summary of the run: engine costs, host counters, guest state, time series."""
        page = 1 << PAGE_SHIFT
        engine = self.engine
        costs = engine.counters.as_dict() if engine else {}
        host = self.host.counters
        reported_pages = costs.get("pages_reported", 0)
        return {
            "engine": engine.name if engine else None,
            "order": self.config.order,
            "ram_bytes": self.config.total_pages * page,
            "seconds": self.clock.now,
            "costs": costs,
            "host": {
                "reports": host.reports,
                "pages_discarded": host.pages_discarded,
                "blocks_reported_again": host.blocks_reported_again,
                "pages_reported_again": host.pages_reported_again,
                "refaults": host.refaults,
                "balloon_faults": host.balloon_faults,
            },
            "reported_bytes_now": self.host.reported_pages * page,
            "free_bytes_now": sum(self.alloc.zone_free) * page,
            "visited_per_reported_page": (
                costs.get("visited", 0) / reported_pages if reported_pages else None
            ),
            "allocator_lock_acquisitions": self.alloc.zone_lock_acquisitions,
            "alloc_failures": self.alloc.alloc_failures,
            "series": [(s.time, s.reported_bytes, s.free_bytes) for s in self.samples],
        }
