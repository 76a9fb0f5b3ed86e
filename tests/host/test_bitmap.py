from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from daemon.host import bitmap


@st.composite
def page_sets(draw: st.DrawFn, max_pages: int = 700) -> NDArray[np.bool_]:
    n = draw(st.integers(0, max_pages))
    runs = draw(st.lists(st.tuples(st.integers(0, max(n - 1, 0)), st.integers(1, 130)), max_size=8))
    density = draw(st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pages = rng.random(n) < density
    for start, length in runs:
        pages[start : start + length] = draw(st.booleans())
    return pages


@given(page_sets())
def test_pack_roundtrip_and_count(pages: NDArray[np.bool_]) -> None:
    bits = bitmap.from_bool(pages)
    assert len(bits) == bitmap.nwords(len(pages))
    assert np.array_equal(bitmap.to_bool(bits, len(pages)), pages)
    assert bitmap.count(bits) == int(pages.sum())
    # Padding past the last page stays clear.
    assert bitmap.count(bits) == int(np.unpackbits(bits.view(np.uint8)).sum())


@given(page_sets())
def test_ranges_roundtrip(pages: NDArray[np.bool_]) -> None:
    n = len(pages)
    starts, ends = bitmap.to_ranges(bitmap.from_bool(pages), n)
    assert np.all(ends > starts) and np.all(starts[1:] > ends[:-1])
    assert bitmap.count_runs(bitmap.from_bool(pages)) == len(starts)
    rebuilt = bitmap.from_ranges(starts, ends, n)
    assert np.array_equal(bitmap.to_bool(rebuilt, n), pages)


@given(page_sets(), st.data())
def test_from_ranges_split_anywhere(pages: NDArray[np.bool_], data: st.DataObject) -> None:
    # Adjacent ranges (a run cut in pieces, as PAGEMAP_SCAN returns present/swapped) still work.
    n = len(pages)
    starts, ends = bitmap.to_ranges(bitmap.from_bool(pages), n)
    cut_s, cut_e = [], []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        mid = data.draw(st.integers(s, e))
        cut_s += [s, mid]
        cut_e += [mid, e]
    bits = bitmap.from_ranges(np.array(cut_s), np.array(cut_e), n)
    assert np.array_equal(bitmap.to_bool(bits, n), pages)


@given(page_sets(), st.data())
def test_count_in(pages: NDArray[np.bool_], data: st.DataObject) -> None:
    n = len(pages)
    pairs = data.draw(st.lists(st.tuples(st.integers(0, n), st.integers(0, n)), max_size=6))
    s = np.array([min(a, b) for a, b in pairs], dtype=np.int64)
    e = np.array([max(a, b) for a, b in pairs], dtype=np.int64)
    got = bitmap.count_in(bitmap.from_bool(pages), s, e)
    assert got.tolist() == [int(pages[a:b].sum()) for a, b in zip(s, e, strict=True)]


@given(page_sets(), st.integers(-2, 800))
def test_first_set(pages: NDArray[np.bool_], k: int) -> None:
    n = len(pages)
    kept = bitmap.to_bool(bitmap.first_set(bitmap.from_bool(pages), k), n)
    expected = np.zeros(n, dtype=bool)
    expected[np.flatnonzero(pages)[: max(k, 0)]] = True
    assert np.array_equal(kept, expected)


@settings(max_examples=60)
@given(page_sets(max_pages=3000), st.integers(0, 8))
def test_block_any(pages: NDArray[np.bool_], order: int) -> None:
    n = len(pages)
    size = 1 << order
    nblocks = n // size
    got = bitmap.block_any(bitmap.from_bool(pages), order, nblocks)
    assert got.tolist() == [bool(pages[i * size : (i + 1) * size].any()) for i in range(nblocks)]


def test_low_mask_edges() -> None:
    masks = bitmap.low_mask(np.array([0, 1, 63, 64]))
    assert [int(m) for m in masks] == [0, 1, (1 << 63) - 1, (1 << 64) - 1]
