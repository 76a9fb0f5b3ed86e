"""What every reporting engine shares: its attachment to the model and its cost counters."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from typing import ClassVar

from ..buddy import BuddyAllocator
from ..clock import PRIO_ENGINE, SimClock
from ..constants import PAGE_REPORTING_CAPACITY, pageblock_order
from ..costs import OpCosts

# Receives one device call's worth of blocks, (pfn, order) each, while they are isolated.
ReportSink = Callable[[list[tuple[int, int]]], None]

# A reporting pass as a generator: it yields how long to wait (a device call in flight) and
# resumes when that time has passed; 0 resumes at once. ``Engine._run`` drives it.
PassSteps = Generator[float, None, None]


@dataclass
class CostCounters:
    """The work an engine does, in the units the reviewers asked about."""

    visited: int = 0  # free-list entries, bitmap bits or hints examined
    visited_locked: int = 0  # ... of which while holding the zone lock
    lock_acquisitions: int = 0  # zone lock taken by the reporting code
    reports: int = 0  # calls into the device (each one a host exit)
    blocks_reported: int = 0
    pages_reported: int = 0
    hints: int = 0  # hints produced on the free path (bitmap bits, captured hints, per-page)
    hints_lost: int = 0  # hints whose block was no longer free when processed, or dropped
    reallocated_before_host: int = 0  # reports whose pages were reused before the host acted
    passes: int = 0  # worker runs
    isolate_failures: int = 0  # __isolate_free_page refused by the min watermark
    report_seconds: float = 0.0  # simulated time device calls were in flight, summed
    isolated_page_seconds: float = 0.0  # pages held isolated by those calls x their duration
    racing_allocations: int = 0  # allocations made while a device call was in flight
    racing_alloc_failures: int = 0  # ... of which found no memory

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Engine:
    """Base class. Subclasses set ``name`` and implement ``_install``.

    ``order`` is the reporting order (``page_reporting_order``); ``capacity`` the most blocks one
    device call carries (each design's own, ``default_capacity``, unless given); ``attach`` hooks
    the engine into an allocator and a clock and registers it, which, as in the kernel, requests
    a first pass.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_capacity: ClassVar[int] = PAGE_REPORTING_CAPACITY
    # The host discards whole blocks (its THP backing survives a 2 MiB report); False when the
    # design's unit is the 4 KiB page (cmma's page states), which splits the host's THP.
    discards_whole_blocks: ClassVar[bool] = True

    def __init__(self, order: int = pageblock_order, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.order = order
        self.capacity = self.default_capacity if capacity is None else capacity
        self.counters = CostCounters()
        self.costs = OpCosts()
        self.in_flight = 0  # pages isolated in the device call now in flight
        self._alloc: BuddyAllocator | None = None
        self._clock: SimClock | None = None
        self._sink: ReportSink | None = None

    @property
    def alloc(self) -> BuddyAllocator:
        if self._alloc is None:
            raise RuntimeError(f"engine {self.name} is not attached")
        return self._alloc

    @property
    def clock(self) -> SimClock:
        if self._clock is None:
            raise RuntimeError(f"engine {self.name} is not attached")
        return self._clock

    def attach(
        self,
        alloc: BuddyAllocator,
        clock: SimClock,
        sink: ReportSink,
        costs: OpCosts | None = None,
    ) -> None:
        """Hook into ``alloc``; with ``costs`` that time reports, a device call takes time."""
        if self._alloc is not None:
            raise RuntimeError(f"engine {self.name} is already attached")
        self._alloc = alloc
        self._clock = clock
        self._sink = sink
        if costs is not None:
            self.costs = costs
        self._install()

    def _install(self) -> None:
        raise NotImplementedError

    def bind_host(self, state: bytearray) -> None:
        """The host's per-page backing state; only a design the host scans (cmma) reads it."""

    def _run(self, steps: PassSteps) -> None:
        """Run a pass up to its next wait, and schedule the rest after the wait."""
        self.in_flight = 0
        for delay in steps:
            if delay > 0:
                self.clock.schedule(delay, lambda: self._run(steps), PRIO_ENGINE)
                return
            self.in_flight = 0

    def _report(self, batch: list[tuple[int, int]]) -> float:
        """prdev->report(): one device call for the whole batch; returns how long it takes.

        The host discards the blocks now; the caller waits the returned time (yields it)
        before it drains them, and until then they stay isolated: no allocation can take them.
        """
        c = self.counters
        pages = sum(1 << order for _, order in batch)
        c.reports += 1
        c.blocks_reported += len(batch)
        c.pages_reported += pages
        if self._sink is not None:
            self._sink(batch)
        seconds = self.costs.report(batch)
        if seconds > 0:
            self.in_flight = pages
            c.report_seconds += seconds
            c.isolated_page_seconds += pages * seconds
        return seconds

    def note_allocation(self, failed: bool) -> None:
        """The guest allocated (or failed to): count it if it raced a device call."""
        if self.in_flight:
            self.counters.racing_allocations += 1
            if failed:
                self.counters.racing_alloc_failures += 1
