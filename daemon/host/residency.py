"""Residency scans: which 4 KiB pages of a guest-RAM mapping the host still backs.

Three methods, each returning a ``Snapshot`` (a packed page bitmap, see ``daemon.host.bitmap``):

- ``scan_pagemap_scan(pagemap_fd, start, npages)``: the PAGEMAP_SCAN ioctl on
  ``/proc/PID/pagemap`` (Linux 6.7+). The kernel walks the page tables and returns only ranges of
  present or swapped pages, skipping empty page-table levels, so a sparse mapping costs little.
  ``pagemap_scan_supported()`` probes the kernel once.
- ``scan_pagemap(pagemap_fd, start, npages)``: read 8 bytes per page from ``/proc/PID/pagemap``
  and decode them with numpy (bit 63 present, bit 62 swapped). Works on any kernel.
- ``scan_seek_data(fd, file_offset, npages)``: SEEK_DATA/SEEK_HOLE over the backing file of
  fd-backed RAM (memfd, tmpfs, hugetlbfs). This sees the file's pages whether or not QEMU has them
  mapped, which is what the host pays for.

"Backed" means present in RAM or swapped out: a swapped page is still the guest's memory (the host
has not got it back, only moved it), so it counts as backed, and ``swapped_pages`` says how much
of it is in swap (None for SEEK_DATA, which cannot tell).

Scanners raise OSError; ``daemon.host.view`` turns it into an ``Unavailable``. They release the
GIL in the syscalls, so a caller may run them in a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import time
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from daemon.host import bitmap
from daemon.host.bitmap import Bits
from daemon.model.constants import PAGE_SHIFT, PAGE_SIZE

# include/uapi/linux/fs.h
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, struct pm_scan_arg)
# fs/proc/task_mmu.c: pagemap entry bits
PM_PRESENT_SHIFT = 63
PM_SWAP_SHIFT = 62


class Method(StrEnum):
    PAGEMAP_SCAN = "pagemap_scan"
    PAGEMAP = "pagemap"
    SEEK_DATA = "seek_data"


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Which pages of one mapping were backed, as of ``at``."""

    backed: Bits  # packed bitmap, one bit per 4 KiB page
    npages: int
    method: Method
    at: float  # wall-clock time (epoch seconds) when the scan finished
    backed_pages: int
    swapped_pages: int | None  # of backed_pages; None when the method cannot tell
    runs: int  # maximal runs of backed pages: how fragmented the mapping is
    seconds: float  # wall time the scan took
    cpu_seconds: float  # CPU time (user + system) of the scanning thread

    @property
    def resident_pages(self) -> int:
        """Backed pages in RAM (all backed pages when swap cannot be told apart)."""
        return self.backed_pages - (self.swapped_pages or 0)

    def pages(self) -> np.ndarray:
        """One bool per page (unpacked; for tests and small mappings)."""
        return bitmap.to_bool(self.backed, self.npages)


class _PmScanArg(ctypes.Structure):
    # struct pm_scan_arg, include/uapi/linux/fs.h
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


def _regions(fd: int, start: int, end: int, vec_len: int) -> np.ndarray:
    """All (start, end, categories) regions of present or swapped pages in ``[start, end)``.

    One ioctl fills at most ``vec_len`` regions and reports in ``walk_end`` where it stopped;
    the loop resumes there until the walk reaches ``end``. A call may also stop early with
    ``walk_end`` at the start of a region it has already returned (seen on 6.18 with more than
    512 regions), so the next call returns that region again: overlaps are clipped off.
    """
    vec = np.empty((vec_len, 3), dtype=np.uint64)
    arg = _PmScanArg(
        size=ctypes.sizeof(_PmScanArg),
        vec=vec.ctypes.data,
        vec_len=vec_len,
        category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
    )
    parts = []
    pos = start
    while pos < end:
        arg.start, arg.end, arg.walk_end = pos, end, 0
        n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)
        if n:
            parts.append(vec[:n].copy())
        if arg.walk_end <= pos:
            raise OSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {pos:#x}")
        pos = arg.walk_end
    if not parts:
        return np.empty((0, 3), dtype=np.uint64)
    regions = np.concatenate(parts)
    seen_to = np.maximum.accumulate(regions[:, 1])
    regions[1:, 0] = np.maximum(regions[1:, 0], seen_to[:-1])
    return regions[regions[:, 1] > regions[:, 0]]


@functools.cache
def pagemap_scan_supported() -> bool:
    """Whether this kernel has the PAGEMAP_SCAN ioctl (probed once, on our own memory)."""
    probe = np.ones(2 * PAGE_SIZE, dtype=np.uint8)
    addr = (probe.ctypes.data + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            _regions(f.fileno(), addr, addr + PAGE_SIZE, 4)
    except OSError:
        return False
    return True


def scan_pagemap_scan(pagemap_fd: int, start: int, npages: int, *, vec_len: int = 4096) -> Snapshot:
    """Scan ``npages`` from virtual address ``start`` with the PAGEMAP_SCAN ioctl."""
    t0, c0 = time.perf_counter(), time.thread_time()
    end = start + npages * PAGE_SIZE
    regions = _regions(pagemap_fd, start, end, vec_len)
    first = ((regions[:, 0] - np.uint64(start)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    last = ((regions[:, 1] - np.uint64(start)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    backed = bitmap.from_ranges(first, last, npages)
    swapped = (regions[:, 2] & np.uint64(PAGE_IS_SWAPPED)) != 0
    return Snapshot(
        backed=backed,
        npages=npages,
        method=Method.PAGEMAP_SCAN,
        at=time.time(),
        backed_pages=int((last - first).sum()),
        swapped_pages=int((last - first)[swapped].sum()),
        runs=bitmap.count_runs(backed),
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.thread_time() - c0,
    )


def scan_pagemap(
    pagemap_fd: int, start: int, npages: int, *, chunk_pages: int = 1 << 17
) -> Snapshot:
    """Scan ``npages`` from virtual address ``start`` by reading ``/proc/PID/pagemap``."""
    t0, c0 = time.perf_counter(), time.thread_time()
    chunk_pages = max(chunk_pages - chunk_pages % bitmap.WORD_PAGES, bitmap.WORD_PAGES)
    entries = np.empty(chunk_pages, dtype="<u8")
    backed = bitmap.zeros(npages)
    swapped = 0
    for first in range(0, npages, chunk_pages):
        n = min(chunk_pages, npages - first)
        view = entries[:n]
        offset = ((start >> PAGE_SHIFT) + first) * 8
        got = os.preadv(pagemap_fd, [view.data.cast("B")], offset)
        if got != n * 8:
            raise OSError(errno.EIO, f"short pagemap read at {start + first * PAGE_SIZE:#x}")
        state = view >> np.uint64(PM_SWAP_SHIFT)  # 2 present, 1 swapped, 0 neither
        swapped += int(np.count_nonzero(state == 1))
        w = first // bitmap.WORD_PAGES
        backed[w : w + bitmap.nwords(n)] = bitmap.from_bool(state != 0)
    return Snapshot(
        backed=backed,
        npages=npages,
        method=Method.PAGEMAP,
        at=time.time(),
        backed_pages=bitmap.count(backed),
        swapped_pages=swapped,
        runs=bitmap.count_runs(backed),
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.thread_time() - c0,
    )


def scan_seek_data(fd: int, file_offset: int, npages: int) -> Snapshot:
    """Scan ``npages`` of the file behind ``fd`` from ``file_offset`` with SEEK_DATA/SEEK_HOLE.

    ``fd`` must be our own open file description (e.g. from opening ``/proc/PID/fd/N``), never
    one shared with QEMU: lseek moves the file position.
    """
    t0, c0 = time.perf_counter(), time.thread_time()
    end = file_offset + npages * PAGE_SIZE
    starts: list[int] = []
    ends: list[int] = []
    pos = file_offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        starts.append(data)
        ends.append(min(hole, end))
        pos = hole
    base = np.int64(file_offset)
    first = (np.asarray(starts, dtype=np.int64) - base) >> PAGE_SHIFT
    last = (np.asarray(ends, dtype=np.int64) - base + PAGE_SIZE - 1) >> PAGE_SHIFT
    backed = bitmap.from_ranges(first, last, npages)
    return Snapshot(
        backed=backed,
        npages=npages,
        method=Method.SEEK_DATA,
        at=time.time(),
        backed_pages=bitmap.count(backed),
        swapped_pages=None,
        runs=len(starts),
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.thread_time() - c0,
    )
