"""Ground truth of a simulated guest, and the out-of-band channel that serves it.

The channel: next to the QMP socket ``PATH`` the guest listens on ``PATH.truth``. A client
connects and reads one JSON document (UTF-8, ending at EOF); it sends nothing. This is not QMP,
so reclaimd, which only speaks QMP, cannot read the truth by accident, and QEMU's command set
stays untouched. ``read_truth(path)`` is the client.

The document (all sizes in bytes unless a name says pages)::

    {
      "format": 1, "vm": NAME, "pid": PID, "time": UNIX_SECONDS, "virtual_time": SECONDS,
      "ram_bytes": R, "page_size": 4096, "block_bytes": 2097152, "reporting_order": 9,
      "balloon": {"target_bytes": T, "actual_bytes": A},
      "components": {"ballooned", "reported", "untouched", "free_resident", "reportable",
                     "stranded", "cache", "free", "used", "resident"},
      "free_by_order_bytes": [11 orders: free on the buddy lists, as /proc/buddyinfo],
      "returned_by_order_bytes": [11 orders: what reporting at that order would return],
      "blocks": {"free": [pages per block], "used": [...], "reported": [...],
                 "ballooned": [...], "resident": [...]}
    }

Component meanings match the reclaim estimate (see ARCHITECTURE.md): ``reported`` is free guest
memory the host backed once and has discarded since (reporting; not a balloon deflate the guest
has not reused); ``untouched`` is free memory the guest never wrote, which the host never
backed, so neither reporting nor a balloon gets anything back from it; ``free_resident`` is free
guest memory the host still backs, split into ``reportable`` (in free blocks of at least the
reporting order) and ``stranded`` (smaller blocks); ``cache`` is page cache the guest could
drop. ``blocks`` gives page counts per ``block_bytes`` of guest RAM; ``blocks.reported``
counts free pages the guest's allocator has flagged ``PageReported``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from daemon.model.constants import NR_PAGE_ORDERS, PAGE_SIZE

FORMAT = 1
BLOCK_BYTES = 2 << 20  # pageblock_order 9: the granule of the per-block counts
TRUTH_SUFFIX = ".truth"

Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class PageStates:
    """Per-page state of guest RAM, one entry per 4 KiB page.

    ``reported`` is the guest's PageReported flag; ``free_order`` the order of the free buddy
    block a free page belongs to (-1 if the page is not free). On the host side ``resident`` is
    what the host backs now, ``touched`` what it ever backed, and ``deflated`` the pages a
    balloon deflate gave back that the guest has not written since.
    """

    free: Bools
    used: Bools
    ballooned: Bools
    reported: Bools
    cache: Bools
    resident: Bools
    touched: Bools
    deflated: Bools
    free_order: npt.NDArray[np.int8]
    # Free pages per order on the buddy lists (what /proc/buddyinfo shows: not the per-CPU
    # lists), and the guest's page_reporting_order is the document's.
    buddy_by_order: tuple[int, ...] = ()


def truth_path(qmp_socket: Path | str) -> Path:
    return Path(f"{qmp_socket}{TRUTH_SUFFIX}")


def components(pages: PageStates, reporting_order: int) -> dict[str, int]:
    """The reclaim components, in bytes, from per-page state."""
    free_resident = pages.free & pages.resident
    large = pages.free_order >= reporting_order
    counts = {
        "ballooned": pages.ballooned,
        "reported": pages.free & ~pages.resident & pages.touched & ~pages.deflated,
        "untouched": pages.free & ~pages.touched,
        "free_resident": free_resident,
        "reportable": free_resident & large,
        "stranded": free_resident & ~large,
        "cache": pages.cache,
        "free": pages.free,
        "used": pages.used,
        "resident": pages.resident,
    }
    return {name: int(np.count_nonzero(mask)) * PAGE_SIZE for name, mask in counts.items()}


def returned_by_order(pages: PageStates) -> list[int]:
    """Per order: the resident free memory reporting at that order would return (bytes)."""
    resident = pages.free & pages.resident
    orders = pages.free_order[resident]
    return [int(np.count_nonzero(orders >= o)) * PAGE_SIZE for o in range(NR_PAGE_ORDERS)]


def per_block(mask: Bools) -> list[int]:
    per = BLOCK_BYTES // PAGE_SIZE
    n = mask.size
    padded = np.zeros(-(-n // per) * per, dtype=np.int64)
    padded[:n] = mask
    return [int(x) for x in padded.reshape(-1, per).sum(axis=1)]


def document(
    *,
    vm: str,
    pages: PageStates,
    reporting_order: int,
    balloon_target_bytes: int,
    balloon_actual_bytes: int,
    virtual_time: float,
    now: float,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "vm": vm,
        "pid": os.getpid(),
        "time": now,
        "virtual_time": virtual_time,
        "ram_bytes": pages.free.size * PAGE_SIZE,
        "page_size": PAGE_SIZE,
        "block_bytes": BLOCK_BYTES,
        "reporting_order": reporting_order,
        "balloon": {"target_bytes": balloon_target_bytes, "actual_bytes": balloon_actual_bytes},
        "components": components(pages, reporting_order),
        "free_by_order_bytes": [n * PAGE_SIZE for n in pages.buddy_by_order],
        "returned_by_order_bytes": returned_by_order(pages),
        "blocks": {
            "free": per_block(pages.free),
            "used": per_block(pages.used),
            "reported": per_block(pages.free & pages.reported),
            "ballooned": per_block(pages.ballooned),
            "resident": per_block(pages.resident),
        },
    }


async def serve_truth(path: Path, snapshot: Callable[[], dict[str, Any]]) -> asyncio.Server:
    """Listen on ``path``; each connection gets one ``snapshot()`` as JSON, then EOF."""

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(snapshot()).encode())
            await writer.drain()
        except ConnectionError:
            pass  # the reader left early; nothing to clean up beyond the close below
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return await asyncio.start_unix_server(handle, path=str(path))


def read_truth(path: Path | str, timeout: float = 5.0) -> dict[str, Any]:
    """Read one truth document from a ``.truth`` socket (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    doc: dict[str, Any] = json.loads(b"".join(chunks))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown truth format {doc.get('format')!r}")
    return doc


async def read_truth_async(path: Path | str) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    doc: dict[str, Any] = json.loads(data)
    return doc
