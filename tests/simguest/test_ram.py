"""Guest RAM is real host memory: the kernel's view (maps, smaps, SEEK_DATA) must agree."""

from __future__ import annotations

import os

import numpy as np
import pytest

from daemon.host.maps import MEMFD_NAME, parse_maps
from daemon.simguest.ram import GuestRAM, runs

MiB = 1 << 20


def memfd_rss_kib(ram: GuestRAM) -> int:
    """Rss of this process's mapping of ``ram``, from /proc/self/smaps."""
    inode = os.fstat(ram.fd).st_ino
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        fields = line.split()
        if len(fields) >= 6 and fields[4] == str(inode) and MEMFD_NAME in line:
            for detail in lines[i + 1 :]:
                if detail.startswith("Rss:"):
                    return int(detail.split()[1])
    raise AssertionError("memfd mapping not found in /proc/self/smaps")


def test_mapping_looks_like_qemus_memfd_backend() -> None:
    with GuestRAM(8 * MiB) as ram:
        with open("/proc/self/maps") as f:
            vmas = [v for v in parse_maps(f.read()) if v.inode == os.fstat(ram.fd).st_ino]
        assert len(vmas) == 1
        assert vmas[0].path == MEMFD_NAME
        assert vmas[0].perms == "rw-s" and vmas[0].size == 8 * MiB


def test_written_pages_become_resident_and_discarded_ones_go_back() -> None:
    with GuestRAM(16 * MiB) as ram:
        assert memfd_rss_kib(ram) == 0
        ram.write(np.arange(0, 2048, dtype=np.int64))  # 8 MiB
        assert memfd_rss_kib(ram) == 8 * 1024
        ram.discard(np.arange(512, 1024, dtype=np.int64))  # 2 MiB
        ram.discard_range(1536, 256)  # 1 MiB
        assert memfd_rss_kib(ram) == 5 * 1024
        expected = np.zeros(ram.npages, dtype=bool)
        expected[:512] = expected[1024:1536] = expected[1792:2048] = True
        assert np.array_equal(ram.backed, expected)
        assert np.array_equal(ram.resident_by_seek(), expected)


def test_runs_split_pages_into_contiguous_ranges() -> None:
    starts, lengths = runs(np.array([1, 2, 3, 7, 9, 10], dtype=np.int64))
    assert starts.tolist() == [1, 7, 9] and lengths.tolist() == [3, 1, 2]
    empty_starts, empty_lengths = runs(np.array([], dtype=np.int64))
    assert empty_starts.size == empty_lengths.size == 0


def test_the_memfd_is_sealed_against_resizing() -> None:
    with GuestRAM(4 * MiB) as ram, pytest.raises(PermissionError):
        os.ftruncate(ram.fd, 8 * MiB)
