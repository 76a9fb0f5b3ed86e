from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.simguest.events import EventBus


@dataclass
class FakeTimer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeTime:
    now: float = 1000.0
    timers: list[FakeTimer] = field(default_factory=list)

    def schedule(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= end]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = timer.when
            timer.callback()
        self.now = end


def make_bus() -> tuple[EventBus, FakeTime, list[dict[str, Any]]]:
    clock = FakeTime()
    seen: list[dict[str, Any]] = []
    bus = EventBus(schedule=clock.schedule, clock=lambda: clock.now)
    bus.sinks.append(seen.append)
    return bus, clock, seen


def actuals(seen: list[dict[str, Any]]) -> list[int]:
    return [m["data"]["actual"] for m in seen]


def test_balloon_change_is_sent_at_once_then_at_most_once_per_second_with_the_latest() -> None:
    bus, clock, seen = make_bus()
    bus.emit("BALLOON_CHANGE", {"actual": 100})
    assert actuals(seen) == [100]
    clock.advance(0.2)
    bus.emit("BALLOON_CHANGE", {"actual": 90})
    clock.advance(0.3)
    bus.emit("BALLOON_CHANGE", {"actual": 80})  # replaces 90, which is never sent
    assert actuals(seen) == [100]
    clock.advance(0.5)  # one second after the first
    assert actuals(seen) == [100, 80]
    # The held event keeps the time it happened, not the time it was sent.
    assert seen[1]["timestamp"] == {"seconds": 1000, "microseconds": 500000}
    clock.advance(1.0)  # a quiet period ends the throttle
    bus.emit("BALLOON_CHANGE", {"actual": 70})
    assert actuals(seen) == [100, 80, 70]


def test_a_quiet_period_after_a_held_event_keeps_the_next_one_waiting() -> None:
    bus, clock, seen = make_bus()
    bus.emit("BALLOON_CHANGE", {"actual": 3})
    clock.advance(0.5)
    bus.emit("BALLOON_CHANGE", {"actual": 2})
    clock.advance(0.6)  # 2 goes out at t=1.0 and re-arms the timer until t=2.0
    bus.emit("BALLOON_CHANGE", {"actual": 1})
    assert actuals(seen) == [3, 2]
    clock.advance(1.0)
    assert actuals(seen) == [3, 2, 1]


def test_unthrottled_events_are_never_held() -> None:
    bus, clock, seen = make_bus()
    for _ in range(3):
        bus.emit("STOP")
    assert [m["event"] for m in seen] == ["STOP"] * 3
    assert clock.timers == []


def test_throttles_are_per_event_name() -> None:
    bus, _clock, seen = make_bus()
    bus.emit("BALLOON_CHANGE", {"actual": 1})
    bus.emit("MEMORY_DEVICE_SIZE_CHANGE", {"size": 1})
    assert [m["event"] for m in seen] == ["BALLOON_CHANGE", "MEMORY_DEVICE_SIZE_CHANGE"]


def test_close_cancels_timers_and_drops_held_events() -> None:
    bus, clock, seen = make_bus()
    bus.emit("BALLOON_CHANGE", {"actual": 1})
    bus.emit("BALLOON_CHANGE", {"actual": 2})
    bus.close()
    clock.advance(5)
    assert actuals(seen) == [1]
