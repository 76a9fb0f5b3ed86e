"""Packed page bitmaps: one bit per 4 KiB page, 64 pages to a little-endian uint64 word.

Page ``i`` is bit ``i % 64`` of word ``i // 64``. Bits past the last page are always 0. A 64 GiB
mapping takes 2 MiB, and whole-bitmap operations (and, or, popcount) run a word at a time.
Everything here is vectorized with numpy; nothing loops in Python per page or per range.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

Bits = NDArray[np.uint64]
WORD_PAGES = 64
_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_ONE = np.uint64(1)
WORD = np.dtype("<u8")


def nwords(npages: int) -> int:
    return (npages + WORD_PAGES - 1) // WORD_PAGES


def zeros(npages: int) -> Bits:
    return np.zeros(nwords(npages), dtype=WORD)


def from_bool(pages: NDArray[Any]) -> Bits:
    """Pack a bool (or 0/1) array with one entry per page."""
    packed = np.packbits(np.asarray(pages, dtype=bool), bitorder="little")
    out = np.zeros(nwords(len(pages)) * 8, dtype=np.uint8)
    out[: len(packed)] = packed
    return out.view(WORD)


def to_bool(bits: Bits, npages: int) -> NDArray[np.bool_]:
    """Unpack to one bool per page."""
    return np.unpackbits(bits.view(np.uint8), count=npages, bitorder="little").astype(bool)


def count(bits: Bits) -> int:
    """Number of set pages."""
    return int(np.bitwise_count(bits).sum(dtype=np.int64))


def count_runs(bits: Bits) -> int:
    """Number of maximal runs of set pages."""
    carry = np.zeros_like(bits)
    carry[1:] = bits[:-1] >> np.uint64(63)  # the previous word's last page
    return count(bits & ~((bits << np.uint64(1)) | carry))


def low_mask(n: NDArray[Any]) -> Bits:
    """Per element, a word with its lowest ``n`` bits set (0 <= n <= 64)."""
    n = np.asarray(n, dtype=np.uint64)
    small = np.minimum(n, np.uint64(63))
    return np.where(n >= 64, _ALL, (_ONE << small) - _ONE).astype(WORD)


def from_ranges(starts: NDArray[Any], ends: NDArray[Any], npages: int) -> Bits:
    """Set pages ``[starts[i], ends[i])``; ranges must be disjoint, empty ones are ignored.

    Whole words in a range are set through a prefix sum over words; the partial words at either
    end are or-ed in, so the cost is O(words + ranges), not O(pages).
    """
    s = np.asarray(starts, dtype=np.int64)
    e = np.asarray(ends, dtype=np.int64)
    keep = e > s
    s, e = s[keep], e[keep]
    n = nwords(npages)
    bits = np.zeros(n, dtype=WORD)
    if len(s) == 0:
        return bits
    if s.min() < 0 or e.max() > npages:
        raise ValueError("range outside the bitmap")
    head, tail = s // WORD_PAGES, (e - 1) // WORD_PAGES
    one_word = head == tail
    # Ranges inside one word.
    width = (e - s)[one_word]
    shift = (s % WORD_PAGES)[one_word].astype(np.uint64)
    np.bitwise_or.at(bits, head[one_word], low_mask(width) << shift)
    # Ranges over several words: a partial head, whole words between, a partial tail.
    many = ~one_word
    h, t = head[many], tail[many]
    np.bitwise_or.at(bits, h, _ALL << (s[many] % WORD_PAGES).astype(np.uint64))
    np.bitwise_or.at(bits, t, low_mask((e[many] - 1) % WORD_PAGES + 1))
    delta = np.zeros(n + 1, dtype=np.int32)
    np.add.at(delta, h + 1, 1)
    np.add.at(delta, t, -1)
    bits[np.cumsum(delta[:n]) > 0] = _ALL
    return bits


def to_ranges(bits: Bits, npages: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The maximal runs of set pages, as ``(starts, ends)``."""
    pages = to_bool(bits, npages).view(np.int8)
    edges = np.diff(pages, prepend=np.int8(0), append=np.int8(0))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def count_in(bits: Bits, starts: NDArray[Any], ends: NDArray[Any]) -> NDArray[np.int64]:
    """Number of set pages in each ``[starts[i], ends[i])``."""
    s = np.asarray(starts, dtype=np.int64)
    e = np.asarray(ends, dtype=np.int64)
    padded = np.append(bits, np.zeros(1, dtype=WORD))
    before = np.concatenate(([0], np.cumsum(np.bitwise_count(padded), dtype=np.int64)))

    def upto(p: NDArray[np.int64]) -> NDArray[np.int64]:
        w = p // WORD_PAGES
        partial = np.bitwise_count(padded[w] & low_mask(p % WORD_PAGES)).astype(np.int64)
        result: NDArray[np.int64] = before[w] + partial
        return result

    return upto(e) - upto(s)


def first_set(bits: Bits, k: int) -> Bits:
    """A copy of ``bits`` with only its lowest ``k`` set pages kept."""
    if k <= 0:
        return np.zeros_like(bits)
    per_word = np.bitwise_count(bits).astype(np.int64)
    cum = np.cumsum(per_word)
    if cum.size == 0 or k >= cum[-1]:
        return bits.copy()
    w = int(np.searchsorted(cum, k))  # the word holding the k-th set page
    out = bits.copy()
    out[w + 1 :] = 0
    need = k - (int(cum[w - 1]) if w else 0)
    word = int(bits[w])
    kept = 0
    for _ in range(need):  # at most 64 steps, on one word
        low = word & -word
        kept |= low
        word ^= low
    out[w] = np.uint64(kept)
    return out


def block_any(bits: Bits, order: int, nblocks: int) -> NDArray[np.bool_]:
    """For each of the first ``nblocks`` aligned blocks of ``2**order`` pages: is any page set?"""
    if order >= 6:
        per_block = 1 << (order - 6)
        return np.asarray(
            (bits[: nblocks * per_block].reshape(nblocks, per_block) != 0).any(axis=1)
        )
    size = 1 << order
    pages = to_bool(bits, nblocks * size)
    return np.asarray(pages.reshape(nblocks, size).any(axis=1))
