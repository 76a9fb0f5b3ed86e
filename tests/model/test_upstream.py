"""The upstream engine on small hand-checked scenarios (1 GiB guest, one zone, 256 max blocks)."""

from __future__ import annotations

from daemon.model import MIGRATE_MOVABLE
from daemon.model.checks import check_invariants
from daemon.model.constants import MAX_PAGE_ORDER, PG_REPORTED
from daemon.model.engines import UpstreamEngine

from .helpers import small_sim

BLOCKS = 256  # order-10 blocks in 1 GiB


def test_registration_reports_boot_memory_in_budgeted_passes() -> None:
    sim = small_sim(keep_log=True)
    engine = sim.engine
    assert isinstance(engine, UpstreamEngine)
    sim.advance_to(1.99)
    assert sim.log.reported == []
    # budget = ceil(256 / 512) = 1: two full scatterlists per list per pass, then REQUESTED.
    sim.advance_to(2.0)
    assert len(sim.log.reported) == 64
    assert {t for _, _, t in sim.log.reported} == {2.0}
    sim.advance_to(3.99)
    assert len(sim.log.reported) == 64
    sim.advance_to(8.0)
    assert len(sim.log.reported) == BLOCKS
    assert sorted(t for _, _, t in sim.log.reported)[-1] == 8.0
    assert sim.host.reported_pages == BLOCKS << MAX_PAGE_ORDER
    sim.advance_to(30.0)
    assert engine.counters.passes == 4
    assert len(sim.log.reported) == BLOCKS  # idle: nothing left, no more passes


def test_rotation_resumes_where_the_last_batch_stopped() -> None:
    sim = small_sim()
    engine = sim.engine
    assert isinstance(engine, UpstreamEngine)
    sim.advance_to(2.0)
    # 64 isolated; the page after each full batch is seen once to trigger the report and again
    # as the new head (2 x 2); the last of those stops on the exhausted budget: 64 + 3.
    assert engine.counters.visited == 67
    head = next(sim.alloc.iter_list(0, MAX_PAGE_ORDER, MIGRATE_MOVABLE))
    assert not sim.alloc._fl[head] & PG_REPORTED, "the list was not rotated to the stop point"
    entries = list(sim.alloc.iter_list(0, MAX_PAGE_ORDER, MIGRATE_MOVABLE))
    flags = [bool(sim.alloc._fl[p] & PG_REPORTED) for p in entries]
    assert flags == [False] * (BLOCKS - 64) + [True] * 64
    sim.advance_to(4.0)
    # The second pass starts at the first unprocessed block: again exactly 67 entries, not
    # 67 plus a rewalk of the 64 reported blocks.
    assert engine.counters.visited == 134


def test_freed_200_mib_is_reported_within_one_pass() -> None:
    sim = small_sim(keep_log=True)
    sim.advance_to(60.0)
    blocks = [sim.alloc_pages(MAX_PAGE_ORDER) for _ in range(50)]  # 50 x 4 MiB = 200 MiB
    assert min(blocks) >= 0
    before = len(sim.log.reported)
    passes = sim.engine.counters.passes if sim.engine else 0
    for pfn in blocks:
        sim.free_pages(pfn, MAX_PAGE_ORDER)
    sim.advance_to(61.99)
    assert len(sim.log.reported) == before
    sim.advance_to(62.0)
    new = sim.log.reported[before:]
    assert sorted(p for p, _, _ in new) == sorted(blocks)
    assert sim.engine is not None and sim.engine.counters.passes == passes + 1
    check_invariants(sim.alloc)


def test_budget_caps_reports_per_list_per_pass() -> None:
    sim = small_sim(keep_log=True)
    sim.advance_to(60.0)
    engine = sim.engine
    assert engine is not None
    blocks = [sim.alloc_pages(MAX_PAGE_ORDER) for _ in range(200)]
    reports = engine.counters.reports
    for pfn in blocks:
        sim.free_pages(pfn, MAX_PAGE_ORDER)
    sim.advance_to(62.0)
    # nr_free = 256 -> budget 1 -> at most 2 device calls' worth on this list in the pass.
    assert engine.counters.reports - reports == 2
    sim.advance_to(70.0)
    assert engine.counters.blocks_reported >= BLOCKS + 200


def test_watermark_gate_skips_a_zone_close_to_low() -> None:
    sim = small_sim(keep_log=True)
    sim.advance_to(60.0)
    z = sim.alloc.zones[0]
    gate = z.wmark_low + (32 << 9)
    held = []
    while sum(sim.alloc.zone_free) > gate + 1024:
        held.append(sim.alloc_pages(MAX_PAGE_ORDER))
    # Just above the gate: a freed block is reported.
    before = len(sim.log.reported)
    pfn = held.pop()
    sim.free_pages(pfn, MAX_PAGE_ORDER)
    sim.advance_to(70.0)
    assert len(sim.log.reported) == before + 1
    # Below the gate: requests come, passes run, nothing is reported.
    while sum(sim.alloc.zone_free) > gate - 4096:
        held.append(sim.alloc_pages(MAX_PAGE_ORDER))
    blk = sim.alloc_pages(9)
    sim.alloc.drain_all_pages()
    passes = sim.engine.counters.passes if sim.engine else 0
    sim.free_pages(blk, 9)
    sim.alloc.drain_all_pages()
    sim.advance_to(80.0)
    assert sim.engine is not None and sim.engine.counters.passes == passes + 1
    assert len(sim.log.reported) == before + 1


def test_merged_block_is_reported_again_at_the_higher_order() -> None:
    sim = small_sim(keep_log=True)
    sim.advance_to(60.0)
    alloc = sim.alloc
    base = next(alloc.iter_list(0, MAX_PAGE_ORDER, MIGRATE_MOVABLE))
    assert alloc.alloc_at(base, 9) and alloc.alloc_at(base + 512, 9)
    sim.host.touch(base, 9)
    sim.host.touch(base + 512, 9)
    alloc.free_pages(base, 9)
    alloc.drain_all_pages()
    sim.advance_to(70.0)
    assert (base, 9) in [(p, o) for p, o, _ in sim.log.reported]
    assert alloc._fl[base] & PG_REPORTED
    again = sim.host.counters.blocks_reported_again
    alloc.free_pages(base + 512, 9)
    alloc.drain_all_pages()
    assert not alloc._fl[base] & PG_REPORTED  # merging took the flag off
    sim.advance_to(80.0)
    assert sim.log.reported[-1][:2] == (base, 10)
    assert sim.host.counters.blocks_reported_again == again + 1
    assert sim.host.counters.pages_reported_again == 512
    check_invariants(alloc)


def test_page_reporting_order_changes_what_is_reported() -> None:
    sim = small_sim(order=5, keep_log=True)
    sim.advance_to(60.0)
    pfn = sim.alloc_pages(6)
    sim.advance_to(61.0)
    sim.free_pages(pfn, 6)  # not a pcp order: straight to the buddy lists
    sim.advance_to(70.0)
    orders = {o for _, o, _ in sim.log.reported}
    assert min(orders) >= 5
    assert (pfn, 6) in [(p, o) for p, o, _ in sim.log.reported] or any(
        o > 6 and p <= pfn < p + (1 << o) for p, o, _ in sim.log.reported[-4:]
    )
