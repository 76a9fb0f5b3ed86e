"""The page_fault workload and the overhead each design adds to it."""

from __future__ import annotations

import pytest

from daemon.model import SimConfig, Simulation
from daemon.model.costs import OpCosts
from daemon.model.overhead import overhead
from daemon.model.workloads import PageFault

COSTS = OpCosts(
    list_visit=40e-9,
    zone_lock=20e-9,
    hint_exit=5e-6,
    report_call=15e-6,
    discard_2m=8e-6,
    discard_4m=12e-6,
    refault_4k=2e-6,
    refault_2m=200e-6,
    state_store=5e-9,
    fault_4k=2e-6,
    fault_2m=200e-6,
)


def run(engine: str | None, seconds: float = 6.0) -> tuple[Simulation, PageFault]:
    wl = PageFault(tasks=4, map_bytes=32 << 20)
    config = SimConfig(ram_bytes=1 << 30, engine=engine, costs=COSTS, ncpus=4, thp_pcp=False)
    sim = Simulation(config, wl)
    sim.run(seconds)
    return sim, wl


def test_page_fault_tasks_fault_at_the_rate_of_a_fault() -> None:
    sim, wl = run(None, 1.0)
    # 10 ms / 200 us = 50 THP faults per task per step; steps at 0, 0.01, ... 0.99 s (the
    # hundredth step's summed time lands just past 1 s).
    assert wl.faults_per_step == 50
    assert wl.ops == 4 * 50 * 100
    assert wl.failed == 0
    # Each task holds at most one 32 MiB mapping (16 blocks of 2 MiB).
    assert sim.alloc.allocated_pages <= 4 * (32 << 20) >> 12


def test_overhead_prices_the_counts() -> None:
    sim, wl = run("boundary")
    o = overhead(sim, COSTS, wl.tasks * 6.0)
    c = sim.engine.counters if sim.engine else None
    assert c is not None and c.reports > 0
    assert o.walk == pytest.approx(c.visited * 40e-9)
    assert o.exits == pytest.approx(c.reports * 5e-6)
    assert o.flushes == pytest.approx(sim.host.counters.reports * 4 * 5e-6)
    refaulted_2m = -(-sim.host.counters.refaults // 512)
    assert o.refaults == pytest.approx(refaulted_2m * 205e-6)
    assert o.percent == pytest.approx(-100 * o.extra / (24.0 + o.extra))
    assert overhead(run(None, 1.0)[0], COSTS, 4.0).percent == 0.0
