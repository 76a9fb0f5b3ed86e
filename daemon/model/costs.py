"""Per-operation costs: what turns the engines' counts into time.

``OpCosts`` holds one duration per operation, in seconds. The model uses two of them while it
runs (a report takes ``report_call`` plus the host's discard of each block, and the pass waits
that long with the blocks isolated); the rest price the counts afterwards (``overhead``).
The numbers are the host's: ``bench/bench_costs.py`` measures what this machine can and
records, beside each value, how it was measured or which source it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .constants import MAX_PAGE_ORDER, pageblock_order


@dataclass(frozen=True)
class OpCosts:
    """Seconds per operation. All zero: passes are atomic and cost nothing (the count model)."""

    list_visit: float = 0.0  # one free-list entry (or bitmap byte, or hint) examined
    zone_lock: float = 0.0  # an uncontended zone lock round trip
    hint_exit: float = 0.0  # a synchronous exit to the host to pass one hint
    report_call: float = 0.0  # one virtqueue report: kick, host wakes, used-buffer interrupt
    discard_2m: float = 0.0  # the host's MADV_DONTNEED of a populated 2 MiB range
    discard_4m: float = 0.0  # ... of 4 MiB
    refault_4k: float = 0.0  # the guest's touch of a discarded 4 KiB page
    refault_2m: float = 0.0  # ... of a discarded 2 MiB (THP) range
    state_store: float = 0.0  # a page-state store (s390 ESSA): no exit
    fault_4k: float = 0.0  # the workload's own first touch of a 4 KiB page, in the guest
    fault_2m: float = 0.0  # ... of a 2 MiB (THP) page

    def discard(self, order: int) -> float:
        """The host's discard of one block of ``order``: by size, from the 2 and 4 MiB costs."""
        if order >= MAX_PAGE_ORDER:
            return self.discard_4m * (1 << (order - MAX_PAGE_ORDER))
        if order >= pageblock_order:
            return self.discard_2m
        return self.discard_2m / (1 << (pageblock_order - order))

    def report(self, batch: list[tuple[int, int]]) -> float:
        """How long one device call holds its blocks: the round trip plus every discard."""
        return self.report_call + sum(self.discard(order) for _, order in batch)

    @property
    def timed(self) -> bool:
        return self.report_call > 0 or self.discard_2m > 0 or self.discard_4m > 0

    @classmethod
    def from_json(cls, path: Path) -> OpCosts:
        """Read a costs file: ``{"costs": {name: {"seconds": x, "how": "..."}, ...}, ...}``."""
        data: dict[str, Any] = json.loads(path.read_text())
        entries = data["costs"]
        names = {f.name for f in fields(cls)}
        unknown = set(entries) - names
        if unknown:
            raise ValueError(f"{path}: unknown costs {', '.join(sorted(unknown))}")
        values: dict[str, float] = {}
        for name, entry in entries.items():
            seconds = float(entry["seconds"])
            if not seconds >= 0:
                raise ValueError(f"{path}: cost {name} must be >= 0 seconds, not {seconds}")
            values[name] = seconds
        return cls(**values)
