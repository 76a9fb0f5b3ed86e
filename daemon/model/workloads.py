"""Deterministic workloads. Each schedules its own steps on the simulation's clock.

Rates and sizes are fractions of guest RAM, so one workload definition scales from 1 GiB to
64 GiB guests with the same shape. Randomness comes from a ``random.Random`` seeded from the
simulation's seed: identical seeds give identical runs.

Trace format (``TraceWorkload``), one operation per line, ``#`` starts a comment::

    # seconds  op  pfn      order  [migratetype]
    0.000      +   262144   9      1
    2.500      -   262144   9

``+`` allocates exactly that block (it must be free; conflicts are counted and skipped), ``-``
frees a block the trace allocated. Migratetype is 0 unmovable, 1 movable (default),
2 reclaimable. This is the shape of ftrace's mm_page_alloc / mm_page_free events.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .clock import PRIO_WORKLOAD
from .constants import MIGRATE_MOVABLE, MIGRATE_UNMOVABLE, pageblock_order
from .simulation import Simulation

STEP = 0.01  # seconds of simulated time per workload step


class WorkloadBase:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self) -> None:
        self._sim: Simulation | None = None
        self.rand = random.Random(0)
        self.ops = 0
        self.failed = 0

    @property
    def sim(self) -> Simulation:
        if self._sim is None:
            raise RuntimeError("workload not started")
        return self._sim

    def start(self, sim: Simulation) -> None:
        self._sim = sim
        self.rand = random.Random(sim.config.seed)
        sim.clock.schedule(0.0, self._tick, PRIO_WORKLOAD)

    def _tick(self) -> None:
        self.step(self.sim.clock.now)
        self.sim.clock.schedule(STEP, self._tick, PRIO_WORKLOAD)

    def step(self, now: float) -> None:
        raise NotImplementedError


class Idle(WorkloadBase):
    name = "idle"
    description = "nothing runs: only the boot-time free memory gets reported"

    def start(self, sim: Simulation) -> None:
        self._sim = sim

    def step(self, now: float) -> None:
        pass


class Memhog(WorkloadBase):
    """memhog: allocate ``fraction`` of RAM at ``rate`` RAM/s, hold, free it all, stay idle.

    Order-0 anonymous pages by default; ``thp`` allocates pageblock-order blocks instead.
    """

    name = "memhog"
    description = "allocate half of RAM, hold 10 s, free it, idle 20 s, repeat"

    def __init__(
        self,
        fraction: float = 0.5,
        rate: float = 0.5,
        hold: float = 10.0,
        idle: float = 20.0,
        thp: bool = False,
    ) -> None:
        super().__init__()
        self.fraction = fraction
        self.rate = rate
        self.hold = hold
        self.idle = idle
        self.order = pageblock_order if thp else 0
        self.live: list[int] = []
        self.phase = "alloc"
        self.phase_end = 0.0
        self.target = 0

    def start(self, sim: Simulation) -> None:
        self.target = int(sim.alloc.managed_pages * self.fraction) >> self.order
        super().start(sim)

    def step(self, now: float) -> None:
        sim = self.sim
        per_step = max(1, int(sim.alloc.managed_pages * self.rate * STEP) >> self.order)
        ncpus = sim.config.ncpus
        order = self.order
        live = self.live
        if self.phase == "alloc":
            alloc = sim.alloc_pages
            count = min(per_step, self.target - len(live))
            for i in range(count):
                pfn = alloc(order, MIGRATE_MOVABLE, i % ncpus)
                if pfn < 0:
                    self.failed += 1
                    break
                live.append(pfn)
            self.ops += count
            sim.minor_faults += count << order
            if len(live) >= self.target or self.failed:
                self.phase, self.phase_end = "hold", now + self.hold
        elif self.phase == "hold":
            if now >= self.phase_end:
                self.phase = "free"
        elif self.phase == "free":
            free = sim.free_pages
            count = min(per_step, len(live))
            for i in range(count):
                free(live.pop(), order, i % ncpus)
            self.ops += count
            if not live:
                self.phase, self.phase_end = "idle", now + self.idle
        elif now >= self.phase_end:
            self.phase = "alloc"
            self.failed = 0


class MemhogThp(Memhog):
    """memhog with THP-sized (pageblock-order) blocks: the variant the README table shows."""

    name = "memhog-thp"
    description = "memhog with THP-sized blocks"

    def __init__(self) -> None:
        super().__init__(thp=True)


# A guest THP fault: allocate and zero 2 MiB. Measured on the host (bench/op_costs.json,
# fault_2m); used when the simulation has no per-operation costs of its own.
FAULT_2M_SECONDS = 2.2e-4


class PageFault(WorkloadBase):
    """will-it-scale page_fault1: ``tasks`` processes each map ``map_bytes``, write every page
    and unmap it, in a loop, as fast as the faults go.

    With ``thp`` (the variant the series was measured with) every fault maps a pageblock-order
    block. A task runs ``STEP / fault_seconds`` faults per step, the rate one vCPU manages at
    the cost of a fault (``OpCosts.fault_2m`` or ``fault_4k``); task ``i`` runs on CPU
    ``i % ncpus``. munmap frees the task's blocks in address (allocation) order.
    """

    name = "page_fault"
    description = "will-it-scale page_fault1: tasks map, touch and unmap 128 MiB in a loop"

    def __init__(self, tasks: int = 16, map_bytes: int = 128 << 20, thp: bool = True) -> None:
        super().__init__()
        self.tasks = tasks
        self.order = pageblock_order if thp else 0
        self.blocks_per_map = max(1, (map_bytes >> 12) >> self.order)
        self.mapped: list[list[int]] = [[] for _ in range(tasks)]
        self.faults_per_step = 1

    def start(self, sim: Simulation) -> None:
        costs = sim.config.costs
        fault = (costs.fault_2m if self.order else costs.fault_4k) if costs else 0.0
        if not fault:
            fault = FAULT_2M_SECONDS if self.order else FAULT_2M_SECONDS / 512
        self.faults_per_step = max(1, round(STEP / fault))
        super().start(sim)

    def step(self, now: float) -> None:
        sim = self.sim
        order = self.order
        ncpus = sim.config.ncpus
        alloc = sim.alloc_pages
        free = sim.free_pages
        for task, mapped in enumerate(self.mapped):
            cpu = task % ncpus
            for _ in range(self.faults_per_step):
                pfn = alloc(order, MIGRATE_MOVABLE, cpu)
                if pfn < 0:
                    self.failed += 1
                    break
                mapped.append(pfn)
                self.ops += 1
                if len(mapped) == self.blocks_per_map:
                    for block in mapped:
                        free(block, order, cpu)
                    mapped.clear()
            sim.minor_faults += self.faults_per_step << order


class Fragment(WorkloadBase):
    """Mixed-order churn that leaves free memory in small pieces.

    Orders 0..3 (weights 8:4:2:1), 10 % of allocations unmovable and long-lived, the rest
    movable and freed in random order; occupancy swings between 35 % and 75 % of RAM with a
    40 s period, so freed memory keeps landing next to pinned blocks.
    """

    name = "fragment"
    description = "orders 0-3 churn with long-lived unmovable pins; occupancy 35-75 %"

    ORDERS = (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3)

    def __init__(self, churn: float = 0.02, low: float = 0.35, high: float = 0.75) -> None:
        super().__init__()
        self.churn = churn
        self.low = low
        self.high = high
        self.period = 40.0
        self.live: list[tuple[int, int]] = []
        self.pinned: list[tuple[int, int]] = []
        self.live_pages = 0

    def step(self, now: float) -> None:
        sim = self.sim
        managed = sim.alloc.managed_pages
        phase = (now % self.period) / self.period
        level = self.low + (self.high - self.low) * (1 - abs(2 * phase - 1))
        target = int(managed * level)
        budget = max(1, int(managed * self.churn * STEP))
        rand = self.rand.random
        choice = self.rand.choice
        randrange = self.rand.randrange
        alloc = sim.alloc_pages
        free = sim.free_pages
        live = self.live
        ncpus = sim.config.ncpus
        orders = self.ORDERS
        for i in range(budget):
            cpu = i % ncpus
            if self.live_pages < target:
                order = choice(orders)
                pinned = rand() < 0.1
                pfn = alloc(order, MIGRATE_UNMOVABLE if pinned else MIGRATE_MOVABLE, cpu)
                if pfn < 0:
                    self.failed += 1
                    break
                (self.pinned if pinned else live).append((pfn, order))
                self.live_pages += 1 << order
                sim.minor_faults += 1 << order
            elif live:
                j = randrange(len(live))
                pfn, order = live[j]
                live[j] = live[-1]
                live.pop()
                free(pfn, order, cpu)
                self.live_pages -= 1 << order
            else:
                break
        # Pins age out slowly, so the pinned set keeps moving across RAM.
        if self.pinned and rand() < 0.2:
            pfn, order = self.pinned.pop(randrange(len(self.pinned)))
            free(pfn, order, 0)
            self.live_pages -= 1 << order
        self.ops += budget


class Churn(WorkloadBase):
    """Mixed-order allocations and frees all the time, around an occupancy that wanders.

    Orders 0 to 10 (small ones most often, and pageblock-sized ones as a THP would take),
    all movable; every step allocates and frees a few percent of RAM at once, so the free
    lists change at every order while free memory moves only slowly: what a busy server does.
    """

    name = "churn"
    description = "mixed-order allocs and frees at once; occupancy wanders 30-70 %"

    ORDERS = (0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 9, 9, 10)

    def __init__(self, rate: float = 0.03, low: float = 0.3, high: float = 0.7) -> None:
        super().__init__()
        self.rate = rate
        self.low = low
        self.high = high
        self.level = (low + high) / 2
        self.live: list[tuple[int, int]] = []
        self.live_pages = 0

    def step(self, now: float) -> None:
        sim = self.sim
        managed = sim.alloc.managed_pages
        rand = self.rand
        # A random walk of the occupancy, reflected at the bounds.
        self.level += rand.uniform(-0.004, 0.004)
        self.level = min(self.high, max(self.low, self.level))
        target = int(managed * self.level)
        budget = max(1, int(managed * self.rate * STEP))
        live = self.live
        ncpus = sim.config.ncpus
        moved = 0
        i = 0
        while moved < budget:
            cpu = i % ncpus
            i += 1
            # Mostly towards the target, sometimes against it: both happen all the time.
            towards = rand.random() < 0.75
            if not live or towards == (self.live_pages < target):
                order = rand.choice(self.ORDERS)
                pfn = sim.alloc_pages(order, MIGRATE_MOVABLE, cpu)
                if pfn < 0:
                    self.failed += 1
                    break
                live.append((pfn, order))
                self.live_pages += 1 << order
                sim.minor_faults += 1 << order
            elif live:
                j = rand.randrange(len(live))
                pfn, order = live[j]
                live[j] = live[-1]
                live.pop()
                sim.free_pages(pfn, order, cpu)
                self.live_pages -= 1 << order
            else:
                break
            moved += 1 << order
        self.ops += i


class PageCacheLoad(WorkloadBase):
    """Steady reads into the page cache with slow release; reclaim trims it under pressure.

    Reads ``rate`` of RAM per second into order-0 movable cache pages (each a major fault),
    truncates ``release`` of the cache per second, and keeps a small anonymous working set.
    """

    name = "pagecache"
    description = "reads fill the page cache; slow release; reclaim under pressure"

    def __init__(self, rate: float = 0.02, release: float = 0.002, anon: float = 0.1) -> None:
        super().__init__()
        self.rate = rate
        self.release = release
        self.anon = anon
        self.anon_live: list[int] = []

    def step(self, now: float) -> None:
        sim = self.sim
        managed = sim.alloc.managed_pages
        reads = max(1, int(managed * self.rate * STEP))
        alloc = sim.alloc_pages
        cache = sim.cache
        ncpus = sim.config.ncpus
        for i in range(reads):
            pfn = alloc(0, MIGRATE_MOVABLE, i % ncpus)
            if pfn < 0:
                self.failed += 1
                break
            cache.add(pfn)
        sim.major_faults += reads
        drop = int(len(cache) * self.release * STEP + self.rand.random())
        cache.release_oldest(drop)
        want = int(managed * self.anon)
        live = self.anon_live
        while len(live) < want:
            pfn = alloc(0, MIGRATE_MOVABLE, 0)
            if pfn < 0:
                break
            live.append(pfn)
            sim.minor_faults += 1
        self.ops += reads + drop


@dataclass
class TraceOp:
    time: float
    alloc: bool
    pfn: int
    order: int
    mt: int = MIGRATE_MOVABLE


def parse_trace(lines: Iterable[str]) -> list[TraceOp]:
    ops: list[TraceOp] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            if parts[1] not in "+-" or len(parts) not in (4, 5):
                raise ValueError
            mt = int(parts[4]) if len(parts) == 5 else MIGRATE_MOVABLE
            op = TraceOp(float(parts[0]), parts[1] == "+", int(parts[2]), int(parts[3]), mt)
        except (ValueError, IndexError):
            raise ValueError(
                f"trace line {lineno}: expected 'SECONDS +|- PFN ORDER [MT]'"
            ) from None
        if ops and op.time < ops[-1].time:
            raise ValueError(f"trace line {lineno}: time goes backwards")
        ops.append(op)
    return ops


@dataclass
class TraceWorkload(WorkloadBase):
    name: ClassVar[str] = "trace"
    description: ClassVar[str] = "replay a trace file of allocations and frees by PFN"

    ops_list: list[TraceOp] = field(default_factory=list)

    def __post_init__(self) -> None:
        WorkloadBase.__init__(self)
        self.index = 0
        self.conflicts = 0
        self.held: set[int] = set()

    @classmethod
    def from_file(cls, path: str | Path) -> TraceWorkload:
        with open(path, encoding="utf-8") as f:
            return cls(parse_trace(f))

    def start(self, sim: Simulation) -> None:
        self._sim = sim
        if self.ops_list:
            sim.clock.schedule_at(self.ops_list[0].time, self._tick, PRIO_WORKLOAD)

    def _tick(self) -> None:
        sim = self.sim
        now = sim.clock.now
        ops = self.ops_list
        while self.index < len(ops) and ops[self.index].time <= now:
            op = ops[self.index]
            self.index += 1
            self.ops += 1
            if op.alloc:
                if op.pfn in self.held or not sim.alloc.alloc_at(op.pfn, op.order):
                    self.conflicts += 1
                    continue
                sim.host.touch(op.pfn, op.order)
                self.held.add(op.pfn)
            elif op.pfn in self.held:
                self.held.discard(op.pfn)
                sim.free_pages(op.pfn, op.order)
            else:
                self.conflicts += 1
        if self.index < len(ops):
            sim.clock.schedule_at(ops[self.index].time, self._tick, PRIO_WORKLOAD)

    def step(self, now: float) -> None:
        pass


WORKLOADS: dict[str, type[WorkloadBase]] = {
    w.name: w for w in (Memhog, MemhogThp, PageFault, Fragment, PageCacheLoad, Churn, Idle)
}


def make_workload(name: str, trace: str | None = None) -> WorkloadBase:
    if name == "trace":
        if not trace:
            raise ValueError("workload 'trace' needs a trace file")
        return TraceWorkload.from_file(trace)
    try:
        return WORKLOADS[name]()
    except KeyError:
        choices = ", ".join([*WORKLOADS, "trace"])
        raise ValueError(f"unknown workload {name!r}; choose from {choices}") from None
