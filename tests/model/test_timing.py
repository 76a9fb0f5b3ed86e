"""Reporting passes take time: a device call holds its blocks isolated while it is in flight."""

from __future__ import annotations

import pytest

from daemon.model.checks import check_invariants
from daemon.model.constants import MAX_PAGE_ORDER, PG_ISOLATED
from daemon.model.costs import OpCosts
from daemon.model.engines import UpstreamEngine

from .helpers import small_sim

BLOCKS = 256  # a 1 GiB single-zone guest is 256 free order-10 blocks
COSTS = OpCosts(report_call=0.001, discard_4m=0.0005)
CALL = 0.001 + 32 * 0.0005  # a full upstream batch of order-10 blocks


def isolated_heads(sim: object) -> set[int]:
    alloc = sim.alloc  # type: ignore[attr-defined]
    return set(alloc.heads(PG_ISOLATED).tolist())


def test_a_pass_takes_the_round_trip_and_the_discards() -> None:
    sim = small_sim("upstream", costs=COSTS)
    engine = sim.engine
    assert isinstance(engine, UpstreamEngine)
    sim.advance_to(2.0 + CALL / 2)  # the first pass started at 2 s; its first call is in flight
    assert engine.counters.reports == 1
    assert len(isolated_heads(sim)) == 32
    assert engine.in_flight == 32 << MAX_PAGE_ORDER
    # The host has discarded them already; the guest gets them back when the call returns.
    assert sim.host.reported_pages == 32 << MAX_PAGE_ORDER
    first = isolated_heads(sim)
    sim.advance_to(2.0 + CALL * 1.5)
    assert engine.counters.reports == 2
    second = isolated_heads(sim)
    assert len(second) == 32 and not second & first
    sim.advance_to(10.0)
    c = engine.counters
    # Budget DIV_ROUND_UP(256, 32 * 16) = 1: two full calls per pass, passes 2 s apart, so
    # the 256 blocks take the passes at 2, 4, 6 and 8 s.
    assert (c.reports, c.blocks_reported, c.passes) == (8, BLOCKS, 4)
    assert c.report_seconds == pytest.approx(8 * CALL)
    assert c.isolated_page_seconds == pytest.approx(BLOCKS * (1 << MAX_PAGE_ORDER) * CALL)
    assert not isolated_heads(sim)
    check_invariants(sim.alloc)


def test_without_costs_a_pass_is_atomic() -> None:
    sim = small_sim("upstream")
    sim.advance_to(2.0)
    assert not isolated_heads(sim)
    assert sim.engine is not None and sim.engine.counters.report_seconds == 0


def test_an_allocation_during_a_call_cannot_take_an_isolated_block() -> None:
    sim = small_sim("upstream", costs=COSTS)
    engine = sim.engine
    assert engine is not None
    sim.advance_to(2.0 + CALL / 2)
    in_flight = isolated_heads(sim)
    assert len(in_flight) == 32
    taken: list[int] = []
    while (pfn := sim.alloc_pages(MAX_PAGE_ORDER)) >= 0:
        taken.append(pfn)
    assert taken, "nothing was allocatable beside the call"
    # Everything else went; none of the isolated blocks, nor any page inside them.
    for pfn in taken:
        assert not any(h <= pfn < h + (1 << MAX_PAGE_ORDER) for h in in_flight)
    assert isolated_heads(sim) == in_flight
    c = engine.counters
    assert c.racing_allocations == len(taken) + 1
    assert c.racing_alloc_failures == 1
    # When the call returns, the blocks are free again and allocatable (the pass goes on with
    # the blocks the watermark kept from the allocations).
    sim.advance_to(2.0 + CALL)
    assert not isolated_heads(sim) & in_flight
    assert sim.alloc_pages(MAX_PAGE_ORDER) in in_flight
    check_invariants(sim.alloc)


@pytest.mark.parametrize("name", ["boundary", "bitmap", "isolate"])
def test_every_batching_engine_waits_for_its_calls(name: str) -> None:
    timed = small_sim(name, costs=COSTS)
    atomic = small_sim(name)
    for sim in (timed, atomic):
        sim.advance_to(30.0)
        check_invariants(sim.alloc)
    assert timed.engine is not None and atomic.engine is not None
    t, a = timed.engine.counters, atomic.engine.counters
    assert t.report_seconds > 0 and a.report_seconds == 0
    # The same memory is reported either way once the passes have finished.
    assert t.pages_reported == a.pages_reported
    assert timed.host.reported_pages == atomic.host.reported_pages
