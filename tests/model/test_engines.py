"""Each alternative engine shows its defining behaviour."""

from __future__ import annotations

from daemon.model import MIGRATE_MOVABLE
from daemon.model.checks import check_invariants
from daemon.model.constants import (
    MAX_PAGE_ORDER,
    MIGRATE_ISOLATE,
    PG_REPORTED,
)
from daemon.model.engines import BoundaryEngine, NaiveEngine

from .helpers import small_sim

BLOCKS = 256


def test_boundary_walks_each_list_about_twice_while_naive_rewalks() -> None:
    boundary = small_sim("boundary")
    naive = small_sim("naive")
    for sim in (boundary, naive):
        sim.advance_to(1.0)
        # v10 has no budget: the whole zone is reported in the first pass, 0.1 s after boot.
        assert sim.host.reported_pages == BLOCKS << MAX_PAGE_ORDER
        check_invariants(sim.alloc)
    assert boundary.engine is not None and naive.engine is not None
    b = boundary.engine.counters.visited
    n = naive.engine.counters.visited
    assert b <= 2 * BLOCKS + 8
    # naive: each search walks back over every block reported by the earlier batches
    # (16 per batch, v10's capacity): 16 * 16 * (0 + 1 + ... + 15) = 30720 skips, plus the
    # 256 finds.
    cap = naive.engine.capacity
    batches = BLOCKS // cap
    assert n >= cap * cap * batches * (batches - 1) // 2 + BLOCKS
    assert boundary.engine.counters.pages_reported == naive.engine.counters.pages_reported


def test_tail_insertion_stops_at_the_boundary_and_removal_pushes_it_back() -> None:
    sim = small_sim("boundary")
    sim.advance_to(1.0)
    alloc = sim.alloc
    engine = sim.engine
    assert isinstance(engine, BoundaryEngine)
    engine.active[0] = True  # as in the middle of a pass
    lid = alloc.list_id(0, MAX_PAGE_ORDER, MIGRATE_MOVABLE)
    entries = list(alloc.iter_list(0, MAX_PAGE_ORDER, MIGRATE_MOVABLE))
    boundary_page, after, moved = entries[100], entries[101], entries[-1]
    alloc.boundary[lid] = boundary_page
    # A tail insertion (putback uses FPI_TO_TAIL) lands just in front of the boundary.
    assert alloc.isolate_free_page(moved, MAX_PAGE_ORDER)
    alloc.putback_isolated_page(moved, MAX_PAGE_ORDER)
    entries = list(alloc.iter_list(0, MAX_PAGE_ORDER, MIGRATE_MOVABLE))
    assert entries.index(moved) == entries.index(boundary_page) - 1
    # Allocating the page at the boundary pushes the boundary to the next entry.
    assert alloc.alloc_at(boundary_page, MAX_PAGE_ORDER)
    assert alloc.boundary[lid] == after
    check_invariants(alloc)


def test_boundary_bulk_move_only_pulls_the_boundary_off_the_moved_page() -> None:
    # v10 reset single boundaries only for compaction; move_freepages_block() went through
    # move_to_free_list(), which pulls the boundary off a reported page it moves.
    sim = small_sim("boundary")
    sim.advance_to(1.0)
    alloc = sim.alloc
    engine = sim.engine
    assert isinstance(engine, BoundaryEngine)
    engine.active[0] = True
    lid = alloc.list_id(0, MAX_PAGE_ORDER, MIGRATE_MOVABLE)
    first, second, third = list(alloc.iter_list(0, MAX_PAGE_ORDER, MIGRATE_MOVABLE))[:3]
    assert alloc._fl[first] & PG_REPORTED
    alloc.boundary[lid] = third
    alloc.move_freepages_block(first, 0)  # a steal-like bulk move to unmovable
    assert alloc.boundary[lid] == third  # another page moved: the boundary stays
    alloc.boundary[lid] = second
    alloc.move_freepages_block(second, 0)
    assert alloc.boundary[lid] == third  # the page at the boundary moved: pulled to the next
    assert first in alloc.iter_list(0, MAX_PAGE_ORDER, 0)
    assert alloc._fl[first] & PG_REPORTED  # still reported on its new list
    check_invariants(alloc)


def test_boundary_notifies_only_past_the_high_water_mark() -> None:
    sim = small_sim("boundary", keep_log=True)
    sim.advance_to(1.0)
    assert sim.engine is not None
    passes = sim.engine.counters.passes
    held = [sim.alloc_pages(MAX_PAGE_ORDER) for _ in range(64)]
    for pfn in held[:31]:
        sim.free_pages(pfn, MAX_PAGE_ORDER)
    sim.advance_to(5.0)
    # nr_free(10) = 192 + 31 < 192 reported + 32: no request.
    assert sim.engine.counters.passes == passes
    sim.free_pages(held[31], MAX_PAGE_ORDER)
    sim.advance_to(10.0)
    assert sim.engine.counters.passes == passes + 1
    assert sorted(p for p, _, _ in sim.log.reported[-32:]) == sorted(held[:32])


def test_naive_is_the_boundary_code_without_the_boundary() -> None:
    assert issubclass(NaiveEngine, BoundaryEngine)
    sim = small_sim("naive")
    sim.advance_to(1.0)
    alloc = sim.alloc
    # No boundary is ever kept: every list's boundary is its list_head.
    assert alloc.boundary == list(range(alloc.total_pages, alloc.total_pages + alloc.nr_lists))


def test_bitmap_loses_hints_for_reallocated_blocks_and_locks_per_find() -> None:
    sim = small_sim("bitmap", keep_log=True)
    sim.advance_to(10.0)
    engine = sim.engine
    assert engine is not None
    c = engine.counters
    assert sim.host.reported_pages == BLOCKS << MAX_PAGE_ORDER
    held = [sim.alloc_pages(MAX_PAGE_ORDER) for _ in range(40)]
    locks, lost, visited = c.lock_acquisitions, c.hints_lost, c.visited
    for pfn in held:
        sim.free_pages(pfn, MAX_PAGE_ORDER)
    again = [sim.alloc_pages(MAX_PAGE_ORDER) for _ in range(10)]  # before the scan
    sim.advance_to(20.0)
    assert c.hints_lost - lost == 10
    assert set(again) <= set(held)
    reported = {p for p, _, _ in sim.log.reported}
    assert not reported & set(again) - set(held[: len(held)])  # reallocated ones were skipped
    # one lock per set bit, plus one per batch drained
    assert c.lock_acquisitions - locks >= 40
    # the scan reads the whole bitmap (256 bits), not just the 40 hints
    assert c.visited - visited >= BLOCKS


def test_perpage_hints_every_free_and_refaults_on_reuse() -> None:
    sim = small_sim("perpage")
    engine = sim.engine
    assert engine is not None
    c = engine.counters
    pages = [sim.alloc_pages(0) for _ in range(100)]
    for pfn in pages:
        sim.free_pages(pfn, 0)
    assert c.hints == 100
    again = [sim.alloc_pages(0) for _ in range(30)]  # from the per-CPU list, before the host
    sim.advance_to(0.5)
    assert c.reallocated_before_host == 30
    assert c.pages_reported == 70
    assert c.lock_acquisitions == 0
    refaults = sim.host.counters.refaults
    more = [sim.alloc_pages(0) for _ in range(20)]
    assert sim.host.counters.refaults - refaults == 20
    assert set(more) <= set(pages) - set(again)


def test_isolate_blocks_pageblocks_then_restores_them() -> None:
    sim = small_sim("isolate", keep_log=True)
    sim.advance_to(10.0)
    alloc = sim.alloc
    engine = sim.engine
    assert engine is not None
    held = [sim.alloc_pages(9) for _ in range(8)]
    alloc.drain_all_pages()
    lost = engine.counters.hints_lost
    for pfn in held:
        sim.free_pages(pfn, 9)
    alloc.drain_all_pages()
    back = sim.alloc_pages(9)
    alloc.drain_all_pages()
    sim.advance_to(20.0)
    assert engine.counters.hints_lost >= lost + 1 or back not in held
    # No pageblock is left isolated, and what was reported is flagged and free.
    assert MIGRATE_ISOLATE not in alloc.pb_mt_arr.tolist()
    for pfn, _order, t in sim.log.reported:
        if t > 10.0:
            head = alloc.free_block_containing(pfn)
            assert head >= 0
    assert any(alloc._fl[p] & PG_REPORTED for p, _, t in sim.log.reported if t > 10.0)
    check_invariants(alloc)


def test_report_capacity_is_per_engine() -> None:
    # v10's driver capped a report at VIRTIO_BALLOON_VRING_HINTS_MAX (16); the merged series
    # carries 32; a per-page hint is one block per exit.
    expected = {"upstream": 32, "boundary": 16, "naive": 16, "bitmap": 32, "isolate": 32}
    for name, cap in expected.items():
        sim = small_sim(name)
        assert sim.engine is not None and sim.engine.capacity == cap, name
        sim.advance_to(3.0)
        c = sim.engine.counters
        assert c.reports > 1, name
        # Every device call is within the capacity and at least one call is full.
        assert c.blocks_reported <= c.reports * cap, name
        assert c.blocks_reported > (c.reports - 1) * cap // 2, name
    v10 = small_sim("boundary")
    v10.advance_to(1.0)
    assert v10.engine is not None
    # The whole zone (256 blocks of order 10) in calls of 16: exactly 16 device calls.
    assert v10.engine.counters.reports == BLOCKS // 16


def test_cmma_stores_a_state_per_change_and_the_host_discards_on_its_scan() -> None:
    sim = small_sim("cmma")
    engine = sim.engine
    assert engine is not None
    pfns = [sim.alloc_pages(0) for _ in range(64)]
    for pfn in pfns:
        sim.free_pages(pfn, 0)
    c = engine.counters
    assert c.hints == 128  # a store for every allocation and every free; no exit, no report
    assert c.reports == 0 and sim.host.reported_pages == 0
    sim.advance_to(1.0)  # the host's scan: every free page, per-CPU lists included
    assert sim.host.reported_pages == sim.alloc.free_page_count()
    # Reusing a discarded page refaults it.
    before = sim.host.counters.refaults
    again = sim.alloc_pages(0)
    assert again in pfns and sim.host.counters.refaults == before + 1
    sim.advance_to(2.0)  # the next scan discards nothing twice
    assert sim.host.counters.blocks_reported_again == 0
    check_invariants(sim.alloc)
