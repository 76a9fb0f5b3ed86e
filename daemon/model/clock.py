"""The simulated clock: the one owner of time in a simulation.

Events sit in a heap ordered by ``(time, priority, sequence)``; the sequence number breaks ties
in insertion order, so two runs that schedule the same events run them in the same order.
There is no wall clock anywhere in the model.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

# Lower runs first at equal times: workload steps, then reporting workers, then host, then sampling.
PRIO_WORKLOAD = 0
PRIO_ENGINE = 10
PRIO_HOST = 20
PRIO_SAMPLE = 30


@dataclass(order=True)
class Event:
    time: float
    priority: int
    seq: int
    action: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class SimClock:
    """Simulated time in seconds and the queue of pending events."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[Event] = []
        self._seq = itertools.count()

    def schedule(self, delay: float, action: Callable[[], None], priority: int = 0) -> Event:
        """Run ``action`` ``delay`` seconds from now."""
        if delay < 0:
            raise ValueError(f"negative delay {delay}")
        return self.schedule_at(self.now + delay, action, priority)

    def schedule_at(self, when: float, action: Callable[[], None], priority: int = 0) -> Event:
        if when < self.now:
            raise ValueError(f"event at {when} is in the past (now {self.now})")
        event = Event(when, priority, next(self._seq), action)
        heapq.heappush(self._heap, event)
        return event

    def next_time(self) -> float | None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].time if self._heap else None

    def advance_to(self, when: float) -> int:
        """Run every event due at or before ``when``, in order; then set the time to ``when``.

        Returns the number of events run. Events may schedule further events, which run too if
        they fall due within the step.
        """
        if when < self.now:
            raise ValueError(f"cannot go back in time from {self.now} to {when}")
        heap = self._heap
        ran = 0
        while heap and heap[0].time <= when:
            event = heapq.heappop(heap)
            if event.cancelled:
                continue
            self.now = event.time
            event.action()
            ran += 1
        self.now = when
        return ran

    def __len__(self) -> int:
        return sum(1 for e in self._heap if not e.cancelled)
