"""How far a reclaim estimate is from a simulated guest's ground truth.

Errors are fractions of guest RAM, as the targets are stated: ``reported`` within 2 %,
``free_resident``, ``reportable`` and ``stranded`` within 3 %, and what reporting at every
order 0..10 would return (``what_if``, the worst order) within 3 %; ``reportable`` and
``stranded`` within 6 % for guests without an agent, whose split is fitted only (and no target
for the what-if there). An estimate
that leaves a component out (``None``: not known, with a reason elsewhere) fails it: a missing
number is not a correct one.

Inputs may be one poll old: an estimate made at ``T`` is held against the truth at every moment
of the window before it (``TruthHistory.window``), and its error is the smallest one. The
guest's stats are pushed on its own timer and stamped in whole seconds, the host scan follows
the poll, so no single instant is *the* moment of an estimate's inputs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

TOLERANCES: dict[str, float] = {
    "reported": 0.02,
    "free_resident": 0.03,
    "reportable": 0.03,
    "stranded": 0.03,
    "what_if": 0.03,
}
# Without an agent the split below the reporting order is not known, so what reporting at a
# lower order would return has no target there (it is measured all the same: see the bench).
NO_AGENT_TOLERANCES: dict[str, float] = {
    "reported": 0.02,
    "free_resident": 0.03,
    "reportable": 0.06,
    "stranded": 0.06,
}
WHAT_IF = "what_if"


@dataclass(frozen=True)
class Estimated:
    """What is compared of an estimate: component bytes and what reporting returns per order."""

    components: Mapping[str, int | None]
    returned_by_order: Sequence[int] | None  # bytes, orders 0..10; None when not given


def estimated(detail: Mapping[str, Any]) -> Estimated:
    """From a VM's REST detail (``GET /api/v1/vms/{name}``)."""
    estimate = detail.get("estimate") or {}
    components = estimate.get("components") or {}
    rows = estimate.get("by_order") or []
    return Estimated(
        {k: (v or {}).get("bytes") for k, v in components.items()},
        [int(r["returned_bytes"]) for r in rows] if len(rows) == 11 else None,
    )


def truth_value(truth: Mapping[str, Any], name: str) -> int | list[int]:
    if name == WHAT_IF:
        return [int(x) for x in truth["returned_by_order_bytes"]]
    return int(truth["components"][name])


def error(estimate: Estimated, truth: Mapping[str, Any], name: str) -> float | None:
    """``|estimate - truth| / RAM`` for one component (the worst order for ``what_if``)."""
    ram = int(truth["ram_bytes"])
    real = truth_value(truth, name)
    if name == WHAT_IF:
        got = estimate.returned_by_order
        if got is None or not isinstance(real, list):
            return None
        return max(abs(g - r) for g, r in zip(got, real, strict=True)) / ram
    value = estimate.components.get(name)
    if value is None or not isinstance(real, int):
        return None
    return abs(value - real) / ram


@dataclass
class TruthHistory:
    """A guest's truth documents, sampled often, for the last ``keep`` seconds."""

    keep: float = 20.0
    samples: deque[dict[str, Any]] = field(default_factory=deque)

    def add(self, truth: dict[str, Any]) -> None:
        self.samples.append(truth)
        while self.samples and self.samples[0]["time"] < truth["time"] - self.keep:
            self.samples.popleft()

    def window(self, start: float, end: float) -> list[dict[str, Any]]:
        return [t for t in self.samples if start <= t["time"] <= end]


class TruthReader:
    """Each guest's truth read every ``every`` seconds in a thread, whatever the caller does.

    An estimate fetched at ``T`` may rest on a scan made a moment before ``T``: it is held
    against the truths of ``[T - age, T]``, so ``window`` waits until a truth at or after ``T``
    has been read (truths read only between fetches would miss the newest inputs).
    """

    def __init__(
        self, readers: Mapping[str, Callable[[], dict[str, Any]]], every: float = 0.25
    ) -> None:
        self.readers = dict(readers)
        self.every = every
        self.histories = {name: TruthHistory() for name in readers}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="truth-reader", daemon=True)
        self._failed: Exception | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for name, read in self.readers.items():
                    truth = read()
                    with self._lock:
                        self.histories[name].add(truth)
                self._stop.wait(self.every)
        except Exception as exc:  # a guest gone: the caller hears of it at its next window
            self._failed = exc

    def window(
        self, name: str, start: float, end: float, wait: float = 5.0
    ) -> list[dict[str, Any]]:
        """The truths of ``[start, end]``, once one at or after ``end`` was read."""
        deadline = time.monotonic() + wait
        while True:
            if self._failed is not None:
                raise RuntimeError(f"reading the guests' truth failed: {self._failed}")
            with self._lock:
                history = self.histories[name]
                if (history.samples and history.samples[-1]["time"] >= end) or (
                    time.monotonic() > deadline
                ):
                    return history.window(start, end)
            time.sleep(self.every / 5)

    def __enter__(self) -> TruthReader:
        self._thread.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(5)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by the nearest-rank rule (no interpolation between samples)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Summary:
    component: str
    tolerance: float
    samples: int
    median: float | None
    p90: float | None
    max: float | None
    missing: int

    @property
    def ok(self) -> bool:
        """p90 over all samples within the limit, and never missing."""
        return self.p90 is not None and self.p90 <= self.tolerance and self.missing == 0


@dataclass
class ErrorSeries:
    """One VM's estimate errors over time, each the smallest over the truths of its window."""

    tolerances: Mapping[str, float] = field(default_factory=lambda: dict(TOLERANCES))
    errors: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)

    def add(self, estimate: Estimated, truths: Sequence[Mapping[str, Any]]) -> None:
        """Record one sample against the truths of its window (at least one)."""
        if not truths:
            raise ValueError("no truth to compare with")
        for name in self.tolerances:
            found = [e for t in truths if (e := error(estimate, t, name)) is not None]
            if not found:
                self.missing[name] = self.missing.get(name, 0) + 1
                continue
            self.errors.setdefault(name, []).append(min(found))

    def summary(self) -> list[Summary]:
        out = []
        for name, limit in self.tolerances.items():
            values = self.errors.get(name, [])
            out.append(
                Summary(
                    component=name,
                    tolerance=limit,
                    samples=len(values),
                    median=quantile(values, 0.5) if values else None,
                    p90=quantile(values, 0.9) if values else None,
                    max=max(values) if values else None,
                    missing=self.missing.get(name, 0),
                )
            )
        return out

    def failures(self, label: str) -> list[str]:
        return [
            f"{label} {m.component}: p90 {m.p90}, max {m.max}, {m.samples} samples, "
            f"{m.missing} missing, limit {m.tolerance}"
            for m in self.summary()
            if not m.ok
        ]
