"""Text captured from QEMU 7.2 (``-M pc -S``) by the live tests' recipe, kept for offline tests.

- ``qemu72-pc-256m``: ``-m 256`` (default RAM, anonymous)
- ``qemu72-pc-memfd-256m``: ``-m 256 -object memory-backend-memfd,id=ram0,size=256M
  -machine memory-backend=ram0``
- ``qemu72-pc-4g-dimms``: ``-m 4G,slots=2,maxmem=8G`` plus a 512 MiB ``memory-backend-ram`` dimm
  ``mem1`` and a 256 MiB ``memory-backend-memfd`` dimm ``mem2``

Each has ``.ramblock.txt`` (x-query-ramblock), ``.mtree.txt`` (info mtree -f), ``.qmp.json``
(query-memdev, query-memory-size-summary) and ``.maps.txt`` (/proc/PID/maps without libraries).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DIR = Path(__file__).parent / "fixtures"
DEFAULT = "qemu72-pc-256m"
MEMFD = "qemu72-pc-memfd-256m"
DIMMS = "qemu72-pc-4g-dimms"


def text(name: str, kind: str) -> str:
    return (DIR / f"{name}.{kind}.txt").read_text()


def qmp(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DIR / f"{name}.qmp.json").read_text())
    return data
