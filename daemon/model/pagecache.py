"""Reclaimable page cache: what makes a guest's available memory larger than its free memory.

Pages are kept in LRU order (oldest on the left). Reclaim, asked for by the allocator's slow
path (standing in for kswapd and direct reclaim), frees the oldest pages first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

FreeFn = Callable[[int, int, int], None]  # (pfn, order, cpu)


class PageCache:
    def __init__(self, free: FreeFn) -> None:
        self._free = free
        self.lru: deque[int] = deque()
        self.reclaimed = 0

    def __len__(self) -> int:
        return len(self.lru)

    def add(self, pfn: int) -> None:
        self.lru.append(pfn)

    def release_oldest(self, pages: int, cpu: int = 0) -> int:
        """Drop up to ``pages`` of the oldest cache pages (truncate, or reclaim). Returns count."""
        lru = self.lru
        free = self._free
        n = min(pages, len(lru))
        for _ in range(n):
            free(lru.popleft(), 0, cpu)
        return n

    def reclaim(self, pages: int) -> int:
        n = self.release_oldest(pages)
        self.reclaimed += n
        return n
