"""The allocator model: the Linux buddy allocator with free page reporting, simulated.

Pure and deterministic: no I/O, no asyncio, no wall clock. Identical configurations and seeds
give identical runs. Kernel names are kept so the code can be read against mm/page_alloc.c and
mm/page_reporting.c.

Stable façade
=============

Running a guest (``daemon.simguest``, benchmarks, ``reclaimd simulate``)::

    from daemon.model import Simulation, SimConfig, make_workload

    sim = Simulation(SimConfig(ram_bytes=4 << 30, engine="upstream", order=9, seed=1,
                               keep_log=True),
                     make_workload("pagecache"))
    sim.on_alloc.append(lambda pfn, order: ...)        # every allocation, as it happens
    sim.on_report.append(lambda pfn, order, t: ...)    # every reported block, at sim time t
    sim.advance_to(12.5)                               # simulated seconds; call with real time
    log = sim.drain_log()                              # SimLog: allocated, freed, reported
    taken = sim.balloon.inflate(1024)                  # PFNs taken (order-0 pages)
    given = sim.balloon.deflate(512)                   # PFNs given back
    info = sim.meminfo()                               # MemInfo: free_pages, ...
    truth = sim.page_states()                          # per page: PAGE_USED/FREE/REPORTED/...

* ``SimConfig(ram_bytes, engine="upstream" | "boundary" | "bitmap" | "perpage" | "isolate" |
  "naive" | None, order=9, ncpus=2, seed=0, reserve=True, single_zone=False,
  sample_interval=1.0, keep_log=False)``. RAM is rounded down to 4 MiB; ``reserve`` keeps
  firmware, a kernel image and the memmap out of the allocator as a boot does.
* ``Simulation.alloc_pages(order, mt=MIGRATE_MOVABLE, cpu=0) -> pfn`` (-1 when out of memory)
  and ``free_pages(pfn, order, cpu=0)``: what workloads use; every allocation is a touch, so
  the host refaults pages it had discarded.
* ``Simulation.advance_to(t)`` / ``run(seconds, progress=None)``: the only ways time moves.
* ``Simulation.balloon``: ``inflate(n) -> list[int]`` allocates ``n`` order-0 movable pages
  (fewer if memory runs out) and hands them to the host; ``deflate(n) -> list[int]`` frees the
  most recently inflated pages. (Kernels that balloon pageblock-order pages are not modelled.)
* ``Simulation.meminfo() -> MemInfo``: the guest kernel's memory counters, from which its
  virtio-balloon driver reports (``free_pages``, ``total_pages``, ``available_pages``,
  ``file_pages``, ``pgmajfault``, ``pgfault``), in pages and counts. The ``pagecache``
  workload keeps reclaimable cache, so available exceeds free.
* ``Simulation.page_states() -> uint8 array``: ground truth per page (``PAGE_USED``,
  ``PAGE_FREE``, ``PAGE_REPORTED``, ``PAGE_BALLOONED``); ``block_states(states, order)`` folds
  it to blocks of any order.
* ``Simulation.result() -> dict``: engine cost counters, host counters, time series; JSON-ready.
* ``sim.host`` (``Host``): what the hypervisor backs; ``sim.alloc`` (``BuddyAllocator``): the
  allocator itself, with ``free_pages_by_order()``.

The reclaim estimate (``daemon.ledger``) reconciles with the allocator at the level of free
pages per order (a *split*), with the pure functions of ``estimate``: ``allocate(split, pages,
order)`` and ``release(split, pages, profile)`` move a split as the buddy allocator moves its free
lists, ``merge_profile(before, after)`` says where freed pages merged to, ``split_free``,
``reportable_by_order`` and ``extra_reportable`` what reporting at an order makes reportable,
and ``upstream_passes``, ``upstream_report_time`` and ``reported_by_upstream`` how long
upstream reporting takes (capacity 32, per-list budget, 2 s delay).

Modules: ``constants`` (kernel constants), ``clock`` (simulated time), ``zones`` (layout and
watermarks), ``buddy`` (the allocator), ``engines`` (reporting designs), ``host`` (discards and
refaults), ``pagecache``, ``stats``, ``workloads`` (generators and trace replay), ``simulation``
(the façade), ``estimate`` (what-ifs), ``checks`` (invariants), ``cli`` and ``plot``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .buddy import AllocationError, BuddyAllocator
from .clock import SimClock
from .constants import (
    MAX_PAGE_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_RECLAIMABLE,
    MIGRATE_UNMOVABLE,
    PAGE_REPORTING_CAPACITY,
    PAGE_REPORTING_DELAY,
    PAGE_SIZE,
    pageblock_order,
)
from .engines import ENGINES, CostCounters, Engine, make_engine
from .estimate import (
    FreeSplit,
    Split,
    allocate,
    extra_reportable,
    merge_profile,
    release,
    reportable_by_order,
    reported_by_upstream,
    split_free,
    upstream_passes,
    upstream_report_time,
)
from .host import Host
from .simulation import (
    PAGE_BALLOONED,
    PAGE_FREE,
    PAGE_REPORTED,
    PAGE_USED,
    Balloon,
    SimConfig,
    SimLog,
    Simulation,
)
from .stats import MemInfo
from .workloads import WORKLOADS, TraceWorkload, make_workload, parse_trace


def block_states(states: npt.NDArray[np.uint8], order: int) -> npt.NDArray[np.uint8]:
    """Fold per-page ground truth to blocks of ``2**order`` pages.

    A block is FREE or REPORTED only if every page in it is; BALLOONED if any page is ballooned
    and none is used; otherwise USED.
    """
    blocks = states.reshape(-1, 1 << order)
    out = np.full(blocks.shape[0], PAGE_USED, dtype=np.uint8)
    free_like = (blocks == PAGE_FREE) | (blocks == PAGE_REPORTED)
    out[free_like.all(axis=1)] = PAGE_FREE
    out[(blocks == PAGE_REPORTED).all(axis=1)] = PAGE_REPORTED
    ballooned = (blocks == PAGE_BALLOONED).any(axis=1) & ~(blocks == PAGE_USED).any(axis=1)
    out[ballooned] = PAGE_BALLOONED
    return out


__all__ = [
    "ENGINES",
    "MAX_PAGE_ORDER",
    "MIGRATE_MOVABLE",
    "MIGRATE_RECLAIMABLE",
    "MIGRATE_UNMOVABLE",
    "PAGE_BALLOONED",
    "PAGE_FREE",
    "PAGE_REPORTED",
    "PAGE_REPORTING_CAPACITY",
    "PAGE_REPORTING_DELAY",
    "PAGE_SIZE",
    "PAGE_USED",
    "WORKLOADS",
    "AllocationError",
    "Balloon",
    "BuddyAllocator",
    "CostCounters",
    "Engine",
    "FreeSplit",
    "Host",
    "MemInfo",
    "SimClock",
    "SimConfig",
    "SimLog",
    "Simulation",
    "Split",
    "TraceWorkload",
    "allocate",
    "block_states",
    "extra_reportable",
    "make_engine",
    "make_workload",
    "merge_profile",
    "pageblock_order",
    "parse_trace",
    "release",
    "reportable_by_order",
    "reported_by_upstream",
    "split_free",
    "upstream_passes",
    "upstream_report_time",
]
