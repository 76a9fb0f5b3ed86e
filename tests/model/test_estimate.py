from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.model import (
    BuddyAllocator,
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
from daemon.model.checks import check_invariants

from .helpers import small_sim


def test_split_and_what_if_orders() -> None:
    by_order = [10, 0, 4, 0, 0, 32, 0, 0, 0, 512, 1024]
    split = split_free(by_order, 9)
    assert (split.reportable_pages, split.stranded_pages) == (1536, 46)
    assert reportable_by_order(by_order)[5] == 1568
    assert extra_reportable(by_order, 9, 5) == 32


def test_upstream_timing_matches_the_simulated_engine() -> None:
    # 256 unreported max-order blocks, nr_free 256: budget 1, 64 per pass, 4 passes of 2 s.
    assert upstream_passes(256, 256) == 4
    assert upstream_report_time(256, 256) == 8.0
    sim = small_sim(keep_log=True)
    sim.advance_to(8.0)
    assert len(sim.log.reported) == 256
    assert max(t for _, _, t in sim.log.reported) == upstream_report_time(256, 256)
    assert upstream_report_time(0, 100) == 0.0


def fragmented(seed: int, pages: int = 65536) -> BuddyAllocator:
    """A single-zone allocator whose free memory is spread over every order: it has allocated
    blocks of mixed orders until about a third was left, then freed a random half of them."""
    rng = random.Random(seed)
    alloc = BuddyAllocator(pages, ncpus=1, single_zone=True)
    held = []
    while alloc.free_page_count() > pages // 3:
        order = rng.choice([0, 0, 0, 0, 1, 2, 3, 5, 9])
        pfn = alloc.alloc_pages(order)
        if pfn < 0:
            break
        held.append((pfn, order))
    rng.shuffle(held)
    for pfn, order in held[: len(held) // 2]:
        alloc.free_pages(pfn, order)
    alloc.drain_all_pages()
    check_invariants(alloc)
    return alloc


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("order", [0, 2, 9])
def test_allocate_moves_a_split_as_the_buddy_allocator_moves_its_free_lists(
    seed: int, order: int
) -> None:
    alloc = fragmented(seed)
    before = alloc.free_pages_by_order().tolist()
    assert sum(1 for x in before[:9] if x) >= 3, before  # fragmented indeed
    blocks = random.Random(seed).randrange(1, sum(before) // 2 >> order)
    for _ in range(blocks):
        assert alloc.alloc_pages(order) >= 0
    alloc.drain_all_pages()  # what the per-CPU lists took and did not use goes back
    assert allocate(before, blocks << order, order) == alloc.free_pages_by_order().tolist()


@pytest.mark.parametrize("seed", range(6))
def test_release_with_the_observed_profile_gives_the_observed_split(seed: int) -> None:
    alloc = fragmented(seed)
    before = alloc.free_pages_by_order().tolist()
    rng = random.Random(seed)
    taken = [alloc.alloc_pages(0) for _ in range(rng.randrange(2000, 8000))]
    alloc.drain_all_pages()
    middle = alloc.free_pages_by_order().tolist()
    for pfn in taken[::2]:
        alloc.free_pages(pfn, 0)
    alloc.drain_all_pages()
    after = alloc.free_pages_by_order().tolist()
    profile = merge_profile(middle, after)
    assert profile is not None and abs(sum(profile) - 1) < 1e-9
    predicted = release(middle, sum(after) - sum(middle), profile)
    assert sum(predicted) == sum(after)
    # The profile is of net gains per order: pages that merged away from an order are what the
    # prediction cannot place, plus less than a block per order of rounding.
    merged_away = sum(max(0, m - a) for m, a in zip(middle, after, strict=True))
    rounding = sum(1 << o for o in range(len(after)))
    off = sum(abs(p - a) for p, a in zip(predicted, after, strict=True))
    assert off <= 2 * (merged_away + rounding), (predicted, after)
    assert sum(x for x in before[:9]) > 0  # the allocator started fragmented


splits = st.lists(st.integers(min_value=0, max_value=1 << 12), min_size=11, max_size=11).map(
    lambda blocks: [n << o for o, n in enumerate(blocks)]
)


@given(splits, st.integers(min_value=0, max_value=1 << 24), st.integers(min_value=0, max_value=10))
def test_allocate_never_invents_or_loses_pages(split: list[int], pages: int, order: int) -> None:
    after = allocate(split, pages, order)
    servable = sum(split[order:])
    want = -(-pages >> order) << order
    assert sum(after) == sum(split) - min(want, servable)
    assert all(x >= 0 and x % (1 << o) == 0 for o, x in enumerate(after))
    assert after[:order] == split[:order]  # smaller blocks cannot serve the request


@given(splits, st.integers(min_value=0, max_value=1 << 24))
def test_release_adds_exactly_what_was_freed(split: list[int], pages: int) -> None:
    profile = [0.0] * 9 + [0.25, 0.75]
    after = release(split, pages, profile)
    assert sum(after) == sum(split) + pages
    assert all(a >= s for a, s in zip(after, split, strict=True))


def test_upstream_reports_at_most_a_budget_per_pass() -> None:
    # nr_free 256 blocks: budget 1, so 64 blocks of one list per 2 s pass.
    assert reported_by_upstream(256, 256, 1.9) == 0
    assert reported_by_upstream(256, 256, 2.0) == 64
    assert reported_by_upstream(256, 256, 7.9) == 192
    assert reported_by_upstream(256, 256, 30.0) == 256
