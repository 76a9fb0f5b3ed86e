"""How far a reclaim estimate is from a simulated guest's ground truth.

Errors are measured as a fraction of guest RAM, which is how the acceptance limits are stated:
``reported`` within 2 %, ``free_resident`` within 5 %, ``stranded`` within 10 %.
An estimate that leaves a component out (``None``: not known, with a reason elsewhere) fails it:
a missing number is not a correct one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOLERANCES: dict[str, float] = {"reported": 0.02, "free_resident": 0.05, "stranded": 0.10}
STEADY_FRACTION = 0.01


@dataclass(frozen=True)
class ComponentError:
    component: str
    estimate: int | None
    truth: int
    ram_bytes: int
    tolerance: float

    @property
    def error_bytes(self) -> int | None:
        return None if self.estimate is None else self.estimate - self.truth

    @property
    def error_fraction(self) -> float | None:
        err = self.error_bytes
        return None if err is None else abs(err) / self.ram_bytes

    @property
    def ok(self) -> bool:
        frac = self.error_fraction
        return frac is not None and frac <= self.tolerance


def compare(
    estimate: Mapping[str, int | None],
    truth: Mapping[str, Any],
    tolerances: Mapping[str, float] = TOLERANCES,
) -> list[ComponentError]:
    """Compare estimate components (bytes) with a truth document from ``read_truth``."""
    ram = int(truth["ram_bytes"])
    if ram <= 0:
        raise ValueError("truth document has no RAM size")
    real = truth["components"]
    return [
        ComponentError(name, estimate.get(name), int(real[name]), ram, limit)
        for name, limit in tolerances.items()
    ]


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
    steady_samples: int
    steady_median: float | None
    steady_p90: float | None
    missing: int

    @property
    def ok(self) -> bool:
        """p90 of the steady samples (of all samples when none was steady) within the limit."""
        basis = self.steady_p90 if self.steady_samples else self.p90
        return basis is not None and basis <= self.tolerance and self.missing == 0


@dataclass
class ErrorSeries:
    """One VM's estimate errors over time, as all samples and as steady samples.

    A sample is steady when no compared component of the truth moved by more than
    ``STEADY_FRACTION`` of RAM since the previous sample. The estimate's inputs are up to one
    stats interval old, so during a fast transient it trails the truth by design; steady
    samples measure the estimate itself.
    """

    tolerances: Mapping[str, float] = field(default_factory=lambda: dict(TOLERANCES))
    errors: dict[str, list[float]] = field(default_factory=dict)
    steady: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    _previous: dict[str, int] | None = None

    def add(self, estimate: Mapping[str, int | None], truth: Mapping[str, Any]) -> bool:
        """Record one sample; returns whether it was steady."""
        now = {name: int(truth["components"][name]) for name in self.tolerances}
        limit = STEADY_FRACTION * int(truth["ram_bytes"])
        before, self._previous = self._previous, now
        steady = before is not None and all(abs(now[k] - before[k]) <= limit for k in now)
        for result in compare(estimate, truth, self.tolerances):
            frac = result.error_fraction
            if frac is None:
                self.missing[result.component] = self.missing.get(result.component, 0) + 1
                continue
            self.errors.setdefault(result.component, []).append(frac)
            if steady:
                self.steady.setdefault(result.component, []).append(frac)
        return steady

    def summary(self) -> list[Summary]:
        out = []
        for name, limit in self.tolerances.items():
            values = self.errors.get(name, [])
            steady = self.steady.get(name, [])
            out.append(
                Summary(
                    component=name,
                    tolerance=limit,
                    samples=len(values),
                    median=quantile(values, 0.5) if values else None,
                    p90=quantile(values, 0.9) if values else None,
                    max=max(values) if values else None,
                    steady_samples=len(steady),
                    steady_median=quantile(steady, 0.5) if steady else None,
                    steady_p90=quantile(steady, 0.9) if steady else None,
                    missing=self.missing.get(name, 0),
                )
            )
        return out


def all_ok(results: Sequence[ComponentError]) -> bool:
    return all(r.ok for r in results)


def table(rows: Sequence[tuple[str, Sequence[ComponentError]]]) -> str:
    """A Markdown table: one row per (label, results), one column per component."""
    if not rows:
        return ""
    names = [r.component for r in rows[0][1]]
    head = "| case | " + " | ".join(f"{n} err (limit)" for n in names) + " |"
    sep = "|---|" + "---|" * len(names)
    lines = [head, sep]
    for label, results in rows:
        cells = []
        for r in results:
            frac = r.error_fraction
            shown = "missing" if frac is None else f"{frac:.2%}"
            cells.append(f"{shown} ({r.tolerance:.0%}){'' if r.ok else ' FAIL'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
