"""Build GuestRamScan values from bool page arrays, for ledger tests without a process."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from daemon.host import bitmap
from daemon.host.maps import GuestRamMapping
from daemon.host.ramblocks import GuestRamBlock, RamBlock
from daemon.host.residency import Method, Snapshot
from daemon.host.view import BlockScan, GuestRamScan


def mapping(name: str, npages: int) -> GuestRamMapping:
    size = npages * 4096
    block = GuestRamBlock(RamBlock(name, 4096, 0, size, size), "memdev-id")
    return GuestRamMapping(block, 0x7F00_0000_0000, size, "anon-size", "", (0, 0), 0, 0, False)


def scan(at: float, **blocks: NDArray[np.bool_]) -> GuestRamScan:
    out = []
    for name, pages in blocks.items():
        bits = bitmap.from_bool(pages)
        snap = Snapshot(
            backed=bits,
            npages=len(pages),
            method=Method.PAGEMAP_SCAN,
            at=at,
            backed_pages=int(pages.sum()),
            swapped_pages=0,
            runs=bitmap.count_runs(bits),
            seconds=0.0,
            cpu_seconds=0.0,
        )
        out.append(BlockScan(mapping(name, len(pages)), snap))
    return GuestRamScan(pid=1, blocks=tuple(out))
