"""When to scan next: adaptive, and bounded by a CPU budget.

``ScanCadence.next_interval(cpu_seconds, changed)`` is fed the CPU time of the scan just done and
whether it saw any page change state. While pages change it returns ``interval``; while nothing
changes it backs off geometrically to ``idle_interval``; and it never returns less than the
smoothed scan cost divided by ``budget``, so scanning this VM averages at most ``budget``
CPU-seconds per second (0.01 = 1% of one core) however large the VM is. The budget wins over
``interval`` and ``idle_interval``: it is the bound that holds. For a daemon-wide budget,
give each VM ``total / number_of_vms``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScanCadence:
    """Next-scan interval for one VM."""

    budget: float = 0.01  # CPU-seconds of scanning per wall-clock second
    interval: float = 1.0  # seconds between scans while pages change
    idle_interval: float = 2.0  # the longest back-off while nothing changes
    backoff: float = 1.5
    smoothing: float = 0.3  # weight of the newest scan in the cost average
    cost: float | None = field(default=None, init=False)  # smoothed CPU-seconds per scan
    _target: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.budget <= 0 or self.interval <= 0 or self.idle_interval < self.interval:
            raise ValueError("need budget > 0, interval > 0 and idle_interval >= interval")
        self._target = self.interval

    def next_interval(self, cpu_seconds: float, changed: bool) -> float:
        """Seconds to wait before the next scan."""
        cpu_seconds = max(cpu_seconds, 0.0)
        self.cost = (
            cpu_seconds
            if self.cost is None
            else self.smoothing * cpu_seconds + (1 - self.smoothing) * self.cost
        )
        if changed:
            self._target = self.interval
        else:
            self._target = min(self._target * self.backoff, self.idle_interval)
        return max(self._target, self.cost / self.budget)

    @property
    def wanted(self) -> float:
        """The interval the changes ask for, before the budget's bound."""
        return self._target

    @property
    def budget_bound(self) -> bool:
        """Whether the CPU budget, not the wanted interval, sets the pace now."""
        return self.cost is not None and self.cost / self.budget > self._target
