"""A repeat limit for log records, so that a flood of requests never floods the log.

Each message (logger, level and the first line of the message's template) is let through at
most ``burst`` times per ``window`` seconds; the rest are counted, and the first record let
through in the next window says how many were left out. The counters that matter (connections
closed, requests refused) are in /metrics, exact; the log only has to say that it happens.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Loggers of the HTTP path: uvicorn's, asyncio's (accept errors) and reclaimd's own.
HTTP_LOGGERS = ("uvicorn.error", "asyncio", "api.connections")
MAX_KEYS = 512  # messages are code constants; the bound guards against preformatted ones


@dataclass
class _Window:
    start: float
    passed: int = 1
    dropped: int = 0


class RepeatLimit(logging.Filter):
    def __init__(
        self, burst: int = 5, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self._windows: OrderedDict[tuple[str, int, str], _Window] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        key = (record.name, record.levelno, template.partition("\n")[0][:200])
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.window:
            self._windows[key] = _Window(start=now)
            self._windows.move_to_end(key)
            while len(self._windows) > MAX_KEYS:
                self._windows.popitem(last=False)
            if window is not None and window.dropped:
                record.msg = f"{template} [{window.dropped} more like this were not logged]"
            return True
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.dropped += 1
        return False


def limit_repeats(
    names: Iterable[str] = HTTP_LOGGERS, burst: int = 5, window: float = 60.0
) -> RepeatLimit:
    """Put one repeat limit on the loggers ``names`` (on their own records, as logged)."""
    limit = RepeatLimit(burst, window)
    for name in names:
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, RepeatLimit)]:
            logger.removeFilter(existing)
        logger.addFilter(limit)
    return limit
