"""The diff on synthetic residency maps: unit cases and properties against a reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from daemon.host import bitmap
from daemon.ledger.diff import Changes, diff, diff_blocks

Pages = NDArray[np.bool_]


def _diff(prev: Pages, cur: Pages, **kw: int) -> Changes:
    return diff(bitmap.from_bool(prev), bitmap.from_bool(cur), len(prev), **kw)


def _pages(c: Changes, mask: NDArray[np.uint64]) -> Pages:
    return bitmap.to_bool(mask, c.npages)


def _blocks(c: Changes) -> list[tuple[int, int]]:
    return list(zip(c.block_offsets.tolist(), c.block_orders.tolist(), strict=True))


def test_aligned_blocks_are_reported_as_maximal_blocks() -> None:
    prev = np.ones(4096, dtype=bool)
    cur = prev.copy()
    cur[1024:2048] = False  # an order-10 block
    cur[512:1024] = False  # an order-9 block whose buddy (0..512) stays: not merged
    cur[2560:3072] = False  # order 9 ...
    cur[3072:3584] = False  # ... next to order 9 of another order-10 parent: two blocks
    c = _diff(prev, cur)
    assert _blocks(c) == [(512, 9), (1024, 10), (2560, 9), (3072, 9)]
    assert c.reported_pages == c.discarded_pages == 512 + 1024 + 512 + 512
    assert c.unexplained_pages == c.ballooned_pages == c.refaulted_pages == 0


def test_block_with_already_absent_part_is_reported_whole() -> None:
    """The guest merged a freshly freed 2 MiB with its never-touched buddy and reported 4 MiB."""
    prev = np.ones(2048, dtype=bool)
    prev[1024:1536] = False
    cur = prev.copy()
    cur[1536:2048] = False
    c = _diff(prev, cur)
    assert _blocks(c) == [(1024, 10)]
    assert c.reported_pages == 1024 and c.discarded_pages == 512


def test_nothing_new_nothing_reported() -> None:
    prev = np.zeros(2048, dtype=bool)
    prev[:100] = True
    c = _diff(prev, prev.copy())
    assert _blocks(c) == [] and not c.changed


def test_small_or_unaligned_holes_are_unexplained() -> None:
    prev = np.ones(2048, dtype=bool)
    cur = prev.copy()
    cur[100:612] = False  # 2 MiB, but not aligned
    cur[1500:1501] = False
    c = _diff(prev, cur)
    assert _blocks(c) == []
    assert c.unexplained_pages == 513


def test_partly_refaulted_block_is_not_reported() -> None:
    prev = np.ones(1024, dtype=bool)
    cur = prev.copy()
    cur[512:1024] = False
    cur[700] = True  # touched again before the scan
    c = _diff(prev, cur)
    assert _blocks(c) == [] and c.unexplained_pages == 511


def test_refaults() -> None:
    prev = np.zeros(1024, dtype=bool)
    cur = prev.copy()
    cur[10:20] = True
    c = _diff(prev, cur)
    assert np.flatnonzero(_pages(c, c.refaulted)).tolist() == list(range(10, 20))
    assert c.went_absent_pages == 0


def test_tail_shorter_than_a_block_is_not_reported() -> None:
    prev = np.ones(512 + 300, dtype=bool)
    cur = prev.copy()
    cur[512:] = False
    c = _diff(prev, cur)
    assert _blocks(c) == [] and c.unexplained_pages == 300


def test_lower_reporting_order() -> None:
    prev = np.ones(1024, dtype=bool)
    cur = prev.copy()
    cur[32:64] = False  # order 5, as virtio_balloon uses with 64 KiB pages
    assert _blocks(_diff(prev, cur)) == []
    assert _blocks(_diff(prev, cur, min_order=5)) == [(32, 5)]


def test_balloon_takes_scattered_pages_first() -> None:
    prev = np.ones(4096, dtype=bool)
    cur = prev.copy()
    cur[1024:2048] = False  # reported
    cur[3000:3400:2] = False  # 200 scattered balloon pages
    c = _diff(prev, cur, balloon_pages=200)
    assert _blocks(c) == [(1024, 10)]
    assert c.ballooned_pages == 200 and c.unexplained_pages == 0


def test_balloon_inflation_filling_whole_blocks_is_ballooned_not_reported() -> None:
    """A balloon that takes pages in sequence empties aligned blocks: still ballooned."""
    prev = np.ones(8192, dtype=bool)
    cur = prev.copy()
    cur[1024:3072] = False  # 8 MiB, aligned, taken page by page by the balloon
    cur[5000:5010] = False
    c = _diff(prev, cur, balloon_pages=2058)
    assert _blocks(c) == [] and c.reported_pages == 0
    assert c.ballooned_pages == 2058 and c.unexplained_pages == 0


def test_balloon_smaller_than_absences_leaves_later_blocks_reported() -> None:
    prev = np.ones(4096, dtype=bool)
    cur = prev.copy()
    cur[0:1024] = False
    cur[2048:3072] = False
    c = _diff(prev, cur, balloon_pages=1024)
    assert _blocks(c) == [(2048, 10)]
    assert c.ballooned_pages == 1024 and c.unexplained_pages == 0
    # A balloon that explains part of a block: the block is not reported, the rest is unexplained.
    c = _diff(prev, cur, balloon_pages=1500)
    assert _blocks(c) == []
    assert c.ballooned_pages == 1500 and c.unexplained_pages == 548


def test_balloon_shared_across_ram_blocks_scattered_first() -> None:
    a_prev, b_prev = np.ones(2048, dtype=bool), np.ones(2048, dtype=bool)
    a_cur, b_cur = a_prev.copy(), b_prev.copy()
    a_cur[0:1024] = False  # a report in block a
    b_cur[100:400:3] = False  # 100 balloon pages in block b
    pairs = [
        (bitmap.from_bool(a_prev), bitmap.from_bool(a_cur), 2048),
        (bitmap.from_bool(b_prev), bitmap.from_bool(b_cur), 2048),
    ]
    a, b = diff_blocks(pairs, balloon_pages=100)
    assert _blocks(a) == [(0, 10)] and a.ballooned_pages == 0
    assert b.ballooned_pages == 100 and _blocks(b) == []


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError):
        diff(bitmap.zeros(64), bitmap.zeros(128), 64)
    with pytest.raises(ValueError):
        diff(bitmap.zeros(64), bitmap.zeros(64), 64, min_order=3, max_order=2)


# Properties -------------------------------------------------------------------------------------


def reference_blocks(prev: Pages, cur: Pages, lo: int, hi: int) -> list[tuple[int, int]]:
    """Maximal qualifying blocks, found the slow obvious way."""
    went = prev & ~cur
    covered = np.zeros(len(prev), dtype=bool)
    found = []
    for order in range(hi, lo - 1, -1):
        size = 1 << order
        for start in range(0, len(prev) - size + 1, size):
            span = slice(start, start + size)
            if not covered[span].any() and not cur[span].any() and went[span].any():
                found.append((start, order))
                covered[span] = True
    return sorted(found)


@st.composite
def residency_pairs(draw: st.DrawFn) -> tuple[Pages, Pages, int, int]:
    lo = draw(st.integers(0, 4))
    hi = draw(st.integers(lo, lo + 3))
    n = draw(st.integers(0, 3000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    prev = rng.random(n) < draw(st.sampled_from([0.5, 0.9, 1.0]))
    cur = prev.copy()
    for _ in range(draw(st.integers(0, 12))):  # reported-like aligned blocks
        order = int(rng.integers(lo, hi + 1))
        if n >> order:
            start = int(rng.integers(0, n >> order)) << order
            cur[start : start + (1 << order)] = False
    flips = rng.random(n) < draw(st.sampled_from([0.0, 0.01, 0.1]))
    cur ^= flips  # scattered discards (balloon-like) and refaults
    return prev, cur, lo, hi


@settings(max_examples=150, deadline=None)
@given(residency_pairs(), st.integers(0, 4000))
def test_classification_properties(case: tuple[Pages, Pages, int, int], balloon: int) -> None:
    prev, cur, lo, hi = case
    c = _diff(prev, cur, balloon_pages=balloon, min_order=lo, max_order=hi)
    went, came = prev & ~cur, cur & ~prev
    reported, discarded = _pages(c, c.reported), _pages(c, c.discarded)
    ballooned, unexplained = _pages(c, c.ballooned), _pages(c, c.unexplained)
    # Every page that went absent is counted exactly once.
    assert not (discarded & ballooned).any()
    assert not (discarded & unexplained).any()
    assert not (ballooned & unexplained).any()
    assert np.array_equal(discarded | ballooned | unexplained, went)
    assert np.array_equal(_pages(c, c.refaulted), came)
    # Classified pages never exceed what changed.
    assert c.went_absent_pages + c.refaulted_pages == int((prev ^ cur).sum())
    # Reported blocks: aligned, inside the mapping, disjoint, wholly absent, exactly the mask.
    ends = c.block_offsets + (1 << c.block_orders)
    assert np.all(c.block_offsets % (1 << c.block_orders) == 0)
    assert np.all(ends <= len(prev)) and np.all(c.block_offsets[1:] >= ends[:-1])
    assert c.reported_pages == int((ends - c.block_offsets).sum())
    assert not (reported & cur).any()
    assert np.array_equal(discarded, reported & went)
    # The balloon explains as much as it grew, no more, and only takes blocks away.
    assert c.ballooned_pages == min(balloon, int(went.sum()))
    expected = reference_blocks(prev, cur, lo, hi)
    if balloon == 0:
        assert _blocks(c) == expected
    else:
        assert set(_blocks(c)) <= set(expected)
