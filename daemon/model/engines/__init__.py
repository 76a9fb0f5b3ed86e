"""Free page reporting engines: every design discussed when the feature was reviewed.

Each engine attaches to a ``BuddyAllocator`` and a ``SimClock``, reports ranges through a sink
and counts its work in ``CostCounters``. ``ENGINES`` maps the CLI names to the classes.
"""

from __future__ import annotations

from .base import CostCounters, Engine, ReportSink
from .bitmap import BitmapEngine
from .cmma import CmmaEngine
from .isolate import IsolateEngine
from .perpage import PerPageEngine
from .upstream import UpstreamEngine
from .v10 import BoundaryEngine, NaiveEngine

ENGINES: dict[str, type[Engine]] = {
    e.name: e
    for e in (
        UpstreamEngine,
        BoundaryEngine,
        BitmapEngine,
        PerPageEngine,
        IsolateEngine,
        NaiveEngine,
        CmmaEngine,
    )
}


def make_engine(name: str, order: int, capacity: int | None = None, **options: float) -> Engine:
    """An engine by CLI name; ``capacity`` None keeps the design's own report capacity;
    ``options`` go to the engine's constructor (``worker_delay`` for v10, for instance)."""
    try:
        cls = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}") from None
    return cls(order=order, capacity=capacity, **options)


__all__ = [
    "ENGINES",
    "BitmapEngine",
    "BoundaryEngine",
    "CmmaEngine",
    "CostCounters",
    "Engine",
    "IsolateEngine",
    "NaiveEngine",
    "PerPageEngine",
    "ReportSink",
    "UpstreamEngine",
    "make_engine",
]
