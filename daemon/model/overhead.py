"""A reporting design's cost to a workload, in CPU time, from a run's counts and ``OpCosts``.

The counts say what each design did; this prices it in the vCPU time it takes from a
CPU-bound workload (will-it-scale's tasks run flat out, so every second taken is throughput
lost):

* ``walk``: free-list entries (bitmap bytes, hints) visited by the worker, ``list_visit`` each;
* ``locks``: zone lock round trips taken by the reporting code;
* ``exits``: a guest exit per device call (the kick) or per hint (``perpage``), or a
  page-state store per hint (``cmma``: no exit);
* ``flushes``: each discard is one mmu-notifier invalidation of the guest's mappings, which
  KVM answers by flushing every vCPU's TLB, an IPI and an exit on each (``hint_exit``);
* ``refaults``: the guest's touch of memory the host discarded: an EPT exit and the host's
  fault of a fresh page, per 2 MiB when the design discards whole blocks (the host's THP is
  intact), per 4 KiB when its unit is the page (cmma: the host's THP is split).

The host's discards run on QEMU's thread, not on a vCPU; they only delay the drain (the
isolation window the simulation models). The change in throughput is
``-extra / (busy + extra)`` with ``busy`` the workload's own CPU time (tasks x seconds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .constants import pageblock_order
from .costs import OpCosts
from .simulation import Simulation


@dataclass(frozen=True)
class Overhead:
    walk: float
    locks: float
    exits: float
    flushes: float
    refaults: float
    busy: float  # the workload's own CPU seconds

    @property
    def extra(self) -> float:
        return self.walk + self.locks + self.exits + self.flushes + self.refaults

    @property
    def percent(self) -> float:
        """Throughput change in percent (negative: slower)."""
        return -100.0 * self.extra / (self.busy + self.extra) if self.busy else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "extra": self.extra, "percent": self.percent}


def overhead(sim: Simulation, costs: OpCosts, busy_seconds: float) -> Overhead:
    """Price ``sim``'s reporting work against ``busy_seconds`` of workload CPU time."""
    engine = sim.engine
    if engine is None:
        return Overhead(0.0, 0.0, 0.0, 0.0, 0.0, busy_seconds)
    c = engine.counters
    if engine.name == "cmma":
        exits = c.hints * costs.state_store
    elif engine.name == "perpage":
        exits = c.hints * costs.hint_exit
    else:
        exits = c.reports * costs.hint_exit
    pages = sim.host.counters.refaults
    if engine.discards_whole_blocks:
        per = 1 << pageblock_order
        refaults = -(-pages // per) * (costs.refault_2m + costs.hint_exit)
    else:
        refaults = pages * (costs.refault_4k + costs.hint_exit)
    return Overhead(
        walk=c.visited * costs.list_visit,
        locks=c.lock_acquisitions * costs.zone_lock,
        exits=exits,
        flushes=sim.host.counters.reports * sim.config.ncpus * costs.hint_exit,
        refaults=refaults,
        busy=busy_seconds,
    )
