"""Guest RAM as QEMU's ``memory-backend-memfd`` holds it: a sealed memfd mapped shared.

Pages the guest writes become resident in the host; discarded ranges go back to the host the
way QEMU's ``ram_block_discard_range`` returns them for fd-backed RAM: ``fallocate`` with
``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` frees the file pages, then
``madvise(MADV_DONTNEED)`` drops the mapping's page tables. ``/proc/PID/maps`` shows the
mapping as ``/memfd:memory-backend-memfd (deleted)``, as for QEMU.

Every write and discard is done at page granularity with numpy, never a Python loop per page.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

import numpy as np
import numpy.typing as npt

from daemon.model.constants import PAGE_SIZE

MEMFD_NAME = "memory-backend-memfd"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# A byte that is not zero, so a page written by the guest is plainly not a zero page.
_MARK = 0xA5

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int

PageIndex = npt.NDArray[np.int64]


def runs(pages: PageIndex) -> tuple[PageIndex, PageIndex]:
    """Split sorted, distinct page numbers into (starts, lengths) of contiguous runs."""
    if pages.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    ends = pages[np.concatenate((breaks - 1, [pages.size - 1]))] + 1
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


class GuestRAM:
    """One RAM block of ``size`` bytes; tracks which pages are resident (``backed``) and which
    were ever written (``touched``)."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError("RAM size must be a positive multiple of the page size")
        self.size = size
        self.npages = size // PAGE_SIZE
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            # QEMU seals its memfd backends (seal=on) so the size cannot change under it.
            fcntl.fcntl(
                self.fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
            )
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self._bytes = np.frombuffer(self._map, dtype=np.uint8).reshape(self.npages, PAGE_SIZE)
        self.backed = np.zeros(self.npages, dtype=bool)
        # Pages written at least once: a free page never touched was never the host's to lose.
        self.touched = np.zeros(self.npages, dtype=bool)

    def write(self, pages: PageIndex) -> None:
        """The guest stores to these pages: each becomes resident."""
        if pages.size:
            self._bytes[pages, 0] = _MARK
            self.backed[pages] = True
            self.touched[pages] = True

    def write_range(self, start: int, count: int) -> None:
        self._bytes[start : start + count, 0] = _MARK
        self.backed[start : start + count] = True
        self.touched[start : start + count] = True

    def discard(self, pages: PageIndex) -> None:
        """Give these pages back to the host, one discard per contiguous run."""
        if pages.size == 0:
            return
        starts, lengths = runs(np.unique(pages))
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            self.discard_range(start, length)

    def discard_range(self, start: int, count: int) -> None:
        offset, length = start * PAGE_SIZE, count * PAGE_SIZE
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")
        self._map.madvise(mmap.MADV_DONTNEED, offset, length)
        self.backed[start : start + count] = False

    def resident_by_seek(self) -> npt.NDArray[np.bool_]:
        """Which pages the memfd holds, asked of the kernel with SEEK_DATA/SEEK_HOLE.

        An independent check of ``backed``: the same view the host side takes of fd-backed RAM.
        """
        present = np.zeros(self.npages, dtype=bool)
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            present[data // PAGE_SIZE : -(-hole // PAGE_SIZE)] = True
            pos = hole
        return present

    def close(self) -> None:
        if self.fd < 0:
            return
        del self._bytes
        self._map.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> GuestRAM:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
