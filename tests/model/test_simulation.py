from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.model import (
    PAGE_BALLOONED,
    PAGE_FREE,
    PAGE_REPORTED,
    PAGE_USED,
    SimConfig,
    Simulation,
    block_states,
    make_workload,
)
from daemon.model.checks import check_invariants
from daemon.model.workloads import TraceWorkload, parse_trace


def run(engine: str, workload: str, seed: int, seconds: float = 20.0) -> dict[str, object]:
    sim = Simulation(
        SimConfig(ram_bytes=256 << 20, engine=engine, seed=seed), make_workload(workload)
    )
    sim.run(seconds)
    check_invariants(sim.alloc)
    return sim.result()


@pytest.mark.parametrize("workload", ["memhog", "fragment", "pagecache", "idle"])
def test_identical_seeds_give_identical_runs(workload: str) -> None:
    assert run("upstream", workload, 7) == run("upstream", workload, 7)


def test_different_seeds_differ() -> None:
    assert run("upstream", "fragment", 1)["series"] != run("upstream", "fragment", 2)["series"]


def test_pagecache_keeps_available_above_free_and_counts_faults() -> None:
    sim = Simulation(SimConfig(ram_bytes=256 << 20, seed=1), make_workload("pagecache"))
    sim.run(60.0)
    info = sim.meminfo()
    assert info.file_pages > 0
    assert info.available_pages > info.free_pages
    assert info.pgmajfault > 0 and info.pgfault > 0
    assert info.total_pages == sim.alloc.managed_pages
    assert sim.cache.reclaimed > 0, "the cache never met memory pressure"


def test_balloon_inflate_and_deflate_return_pfns_and_move_totals() -> None:
    sim = Simulation(SimConfig(ram_bytes=128 << 20, engine=None, keep_log=True))
    total = sim.meminfo().total_pages
    taken = sim.balloon.inflate(1000)
    assert len(taken) == 1000 == len(set(taken))
    assert sim.meminfo().total_pages == total - 1000
    states = sim.page_states()
    assert (states[taken] == PAGE_BALLOONED).all()
    given = sim.balloon.deflate(400)
    assert given == taken[::-1][:400]
    pfn = sim.alloc_pages(0)
    assert pfn >= 0
    faults = sim.host.counters.balloon_faults
    assert faults <= 1
    check_invariants(sim.alloc)


def test_log_hooks_and_ground_truth_agree() -> None:
    sim = Simulation(SimConfig(ram_bytes=256 << 20, keep_log=True, seed=3), make_workload("memhog"))
    seen: list[tuple[int, int, float]] = []
    sim.on_report.append(lambda p, o, t: seen.append((p, o, t)))
    sim.advance_to(40.0)
    log = sim.drain_log()
    assert log.allocated and log.freed and log.reported
    assert log.reported == seen
    assert sim.drain_log().reported == []
    states = sim.page_states()
    free_pages = sim.alloc.free_page_count()
    assert int(((states == PAGE_FREE) | (states == PAGE_REPORTED)).sum()) == free_pages
    assert int((states == PAGE_REPORTED).sum()) <= sim.host.reported_pages
    blocks = block_states(states, 9)
    assert blocks.shape == (states.size >> 9,)
    assert set(np.unique(blocks).tolist()) <= {PAGE_USED, PAGE_FREE, PAGE_REPORTED, PAGE_BALLOONED}


def test_trace_replay_allocates_the_named_blocks(tmp_path: Path) -> None:
    trace = tmp_path / "t.trace"
    trace.write_text(
        "# seconds op pfn order [mt]\n"
        "0.0 + 8192 9 1\n"
        "0.5 + 8192 0\n"  # conflict: already allocated
        "1.0 - 8192 9\n"
        "1.0 + 16384 10 0\n"
    )
    workload = TraceWorkload.from_file(trace)
    sim = Simulation(
        SimConfig(ram_bytes=128 << 20, engine=None, reserve=False, keep_log=True), workload
    )
    sim.advance_to(0.1)
    assert sim.alloc._fl[8192] == 0x04
    sim.advance_to(2.0)
    assert workload.conflicts == 1
    assert sim.alloc._fl[16384] == 0x04 and sim.alloc._od[16384] == 10
    check_invariants(sim.alloc)
    with pytest.raises(ValueError, match="line 1"):
        parse_trace(["0.0 * 1 2"])
