"""Event emission with QEMU's rate limits (monitor/monitor.c, ``monitor_qapi_event_conf``).

A throttled event is sent at once if none of its kind went out in the last period; otherwise it
is held, replacing any event already held, and sent when the period ends. So a client sees the
first and the latest value, at most one per second, and never a stale one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.simguest.wire import event_message

# Events QEMU limits to one per second, because a guest can trigger them at will.
THROTTLE_SECONDS: dict[str, float] = {
    "RTC_CHANGE": 1.0,
    "WATCHDOG": 1.0,
    "BALLOON_CHANGE": 1.0,
    "QUORUM_REPORT_BAD": 1.0,
    "QUORUM_FAILURE": 1.0,
    "VSERPORT_CHANGE": 1.0,
    "MEMORY_DEVICE_SIZE_CHANGE": 1.0,
}

Sink = Callable[[dict[str, Any]], None]


class Timer(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[[float, Callable[[], None]], Timer]


@dataclass
class _Held:
    timer: Timer
    message: dict[str, Any] | None = None


@dataclass
class EventBus:
    """Delivers events to every attached sink, applying QEMU's throttling per event name.

    ``schedule(delay, callback)`` arms a timer (``loop.call_later`` in a running guest); tests
    pass a fake scheduler and clock.
    """

    schedule: Scheduler
    clock: Callable[[], float] = time.time
    throttle: dict[str, float] = field(default_factory=lambda: dict(THROTTLE_SECONDS))
    sinks: list[Sink] = field(default_factory=list)
    _held: dict[str, _Held] = field(default_factory=dict)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        message = event_message(name, data, self.clock())
        period = self.throttle.get(name, 0.0)
        if period <= 0:
            self._deliver(message)
            return
        held = self._held.get(name)
        if held is not None:
            held.message = message
            return
        self._deliver(message)
        self._held[name] = _Held(self.schedule(period, lambda: self._period_over(name)))

    def _period_over(self, name: str) -> None:
        held = self._held[name]
        if held.message is None:
            del self._held[name]
            return
        # The held event keeps the timestamp of when it happened, as in QEMU.
        message, held.message = held.message, None
        self._deliver(message)
        held.timer = self.schedule(self.throttle[name], lambda: self._period_over(name))

    def close(self) -> None:
        """Cancel pending timers; held events are dropped, as when QEMU exits."""
        for held in self._held.values():
            held.timer.cancel()
        self._held.clear()

    def _deliver(self, message: dict[str, Any]) -> None:
        for sink in list(self.sinks):
            sink(message)
