"""The repeat limit on log records: the first few of a message per window, then a count."""

from __future__ import annotations

import logging

import pytest

from api.logthrottle import RepeatLimit, limit_repeats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def records(name: str, msg: str, n: int, *args: object) -> list[logging.LogRecord]:
    return [
        logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args or None, None)
        for _ in range(n)
    ]


def test_first_records_of_a_message_pass_then_a_count_in_the_next_window() -> None:
    clock = Clock()
    limit = RepeatLimit(burst=3, window=60, clock=clock)
    passed = [
        r
        for r in records("uvicorn.error", "Invalid HTTP request received.", 1000)
        if limit.filter(r)
    ]
    assert len(passed) == 3
    # Another message has its own allowance.
    other = records("api.connections", "closed %d", 5, 7)
    assert sum(limit.filter(r) for r in other) == 3
    clock.now += 59
    assert not limit.filter(records("uvicorn.error", "Invalid HTTP request received.", 1)[0])
    clock.now += 2
    summary = records("uvicorn.error", "Invalid HTTP request received.", 1)[0]
    assert limit.filter(summary)
    assert summary.getMessage() == (
        "Invalid HTTP request received. [998 more like this were not logged]"
    )
    late = records("api.connections", "closed %d", 1, 7)[0]
    assert limit.filter(late)
    assert late.getMessage() == "closed 7 [2 more like this were not logged]"


def test_messages_differing_only_after_their_first_line_count_as_one() -> None:
    limit = RepeatLimit(burst=1, window=60, clock=Clock())
    first = records("asyncio", "socket.accept() out of system resource\nsocket: fd=6", 1)[0]
    second = records("asyncio", "socket.accept() out of system resource\nsocket: fd=7", 1)[0]
    assert limit.filter(first) and not limit.filter(second)


def test_installed_on_the_http_loggers(caplog: pytest.LogCaptureFixture) -> None:
    limit_repeats(burst=2)
    try:
        logger = logging.getLogger("uvicorn.error")
        assert sum(isinstance(f, RepeatLimit) for f in logger.filters) == 1
        limit_repeats(burst=2)  # again: replaces, never stacks
        assert sum(isinstance(f, RepeatLimit) for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
            for _ in range(100):
                logger.warning("Exceeded concurrency limit.")
        assert len([r for r in caplog.records if r.name == "uvicorn.error"]) == 2
    finally:
        for name in ("uvicorn.error", "asyncio", "api.connections"):
            for f in [f for f in logging.getLogger(name).filters if isinstance(f, RepeatLimit)]:
                logging.getLogger(name).removeFilter(f)
