from __future__ import annotations

import pytest

from daemon.model import SimClock


def test_events_run_in_time_priority_sequence_order() -> None:
    clock = SimClock()
    ran: list[str] = []
    clock.schedule(2.0, lambda: ran.append("b"), priority=5)
    clock.schedule(2.0, lambda: ran.append("a"), priority=1)
    clock.schedule(2.0, lambda: ran.append("c"), priority=5)
    clock.schedule(1.0, lambda: ran.append("first"))
    cancelled = clock.schedule(1.5, lambda: ran.append("never"))
    cancelled.cancel()
    assert clock.advance_to(1.9) == 1
    assert ran == ["first"] and clock.now == 1.9
    clock.advance_to(3.0)
    assert ran == ["first", "a", "b", "c"]


def test_events_scheduled_by_events_run_within_the_step() -> None:
    clock = SimClock()
    times: list[float] = []

    def tick() -> None:
        times.append(clock.now)
        if clock.now < 1.0:
            clock.schedule(0.25, tick)

    clock.schedule(0.0, tick)
    clock.advance_to(10.0)
    assert times == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_time_never_goes_back() -> None:
    clock = SimClock()
    clock.advance_to(5.0)
    with pytest.raises(ValueError):
        clock.advance_to(4.0)
    with pytest.raises(ValueError):
        clock.schedule(-1.0, lambda: None)
