"""Scanners against real mappings in a child process whose residency we set page by page."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from numpy.typing import NDArray

from daemon.host import bitmap
from daemon.host.residency import (
    Method,
    pagemap_scan_supported,
    scan_pagemap,
    scan_pagemap_scan,
    scan_seek_data,
)
from tests.host.memchild import MemChild, Ranges

PAGES = 8192  # 32 MiB per mapping


def _random_ranges(rng: np.random.Generator, n: int, max_len: int) -> Ranges:
    starts = np.sort(rng.choice(PAGES, size=n, replace=False))
    return [(int(s), int(min(s + rng.integers(1, max_len + 1), PAGES))) for s in starts]


def _apply(truth: NDArray[np.bool_], ranges: Ranges, value: bool) -> None:
    for s, e in ranges:
        truth[s:e] = value


@pytest.fixture
def child() -> Iterator[MemChild]:
    with MemChild() as c:
        yield c


@pytest.fixture
def pagemap_fd(child: MemChild) -> Iterator[int]:
    fd = os.open(f"/proc/{child.pid}/pagemap", os.O_RDONLY)
    yield fd
    os.close(fd)


def test_kernel_has_pagemap_scan() -> None:
    # The host this project targets runs 6.18; the fallback is covered by scan_pagemap below.
    assert pagemap_scan_supported(), "PAGEMAP_SCAN (Linux 6.7+) missing on this kernel"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_anonymous_mapping_all_methods_match_truth(
    child: MemChild, pagemap_fd: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    addr, _ = child.map("anon", "anon", PAGES * 4096)
    truth = np.zeros(PAGES, dtype=bool)
    touched = _random_ranges(rng, 300, 600)
    child.touch("anon", touched)
    _apply(truth, touched, True)
    dropped = _random_ranges(rng, 200, 300)
    child.dontneed("anon", dropped)
    _apply(truth, dropped, False)
    assert 0 < truth.sum() < PAGES

    for snap in (
        scan_pagemap_scan(pagemap_fd, addr, PAGES),
        scan_pagemap_scan(pagemap_fd, addr, PAGES, vec_len=3),  # many partial ioctls
        scan_pagemap(pagemap_fd, addr, PAGES),
        scan_pagemap(pagemap_fd, addr, PAGES, chunk_pages=320),  # chunk edges mid-range
    ):
        assert np.array_equal(snap.pages(), truth), snap.method
        assert snap.backed_pages == int(truth.sum())
        assert snap.swapped_pages == 0  # no swap here; swapped pages would count as backed
        assert snap.npages == PAGES and snap.seconds >= 0 and snap.cpu_seconds >= 0


@pytest.mark.parametrize("seed", [4, 5])
def test_memfd_mapping_all_methods_match_truth(child: MemChild, pagemap_fd: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    addr, fd_no = child.map("ram", "memfd", PAGES * 4096)
    assert fd_no is not None
    truth = np.zeros(PAGES, dtype=bool)
    touched = _random_ranges(rng, 300, 600)
    child.touch("ram", touched)
    _apply(truth, touched, True)
    punched = _random_ranges(rng, 200, 300)
    child.punch("ram", punched)  # as QEMU discards fd-backed RAM: punch a hole and unmap
    _apply(truth, punched, False)

    fd = os.open(f"/proc/{child.pid}/fd/{fd_no}", os.O_RDONLY)
    try:
        snaps = [
            scan_seek_data(fd, 0, PAGES),
            scan_pagemap_scan(pagemap_fd, addr, PAGES),
            scan_pagemap(pagemap_fd, addr, PAGES),
        ]
    finally:
        os.close(fd)
    assert [s.method for s in snaps] == [Method.SEEK_DATA, Method.PAGEMAP_SCAN, Method.PAGEMAP]
    for snap in snaps:
        assert np.array_equal(snap.pages(), truth), snap.method
    assert snaps[0].swapped_pages is None  # SEEK_DATA cannot tell swap apart


def test_memfd_pages_unmapped_but_kept_differ_by_method(child: MemChild, pagemap_fd: int) -> None:
    """MADV_DONTNEED alone unmaps shared pages but keeps them in the file: the host still pays.

    SEEK_DATA sees them (it is why fd-backed RAM is scanned through the file); pagemap does not.
    """
    addr, fd_no = child.map("ram", "memfd", PAGES * 4096)
    child.touch("ram", [(0, 1024)])
    child.dontneed("ram", [(0, 512)])
    fd = os.open(f"/proc/{child.pid}/fd/{fd_no}", os.O_RDONLY)
    try:
        in_file = scan_seek_data(fd, 0, PAGES)
        # A window into the file: the second half of what was touched.
        window = scan_seek_data(fd, 512 * 4096, 1024)
    finally:
        os.close(fd)
    mapped = scan_pagemap_scan(pagemap_fd, addr, PAGES)
    assert in_file.backed_pages == 1024
    assert mapped.backed_pages == 512
    assert bitmap.to_ranges(mapped.backed, PAGES)[0].tolist() == [512]
    assert window.pages()[:512].all() and not window.pages()[512:].any()


def test_sparse_large_mapping(child: MemChild, pagemap_fd: int) -> None:
    """A 16 GiB reservation with a page every 64 MiB: cheap to scan, exact."""
    npages = (16 << 30) // 4096
    addr, _ = child.map("big", "anon", npages * 4096)
    pages = [(p, p + 1) for p in range(0, npages, (64 << 20) // 4096)] + [(npages - 1, npages)]
    child.touch("big", pages)
    snap = scan_pagemap_scan(pagemap_fd, addr, npages)
    starts, ends = bitmap.to_ranges(snap.backed, npages)
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == pages
