"""The per-VM reclaim estimate: how much the host got back, and how much more it could.

Pure arithmetic over observed inputs (see the table in the architecture notes). Every component
says where it came from (``observed``, ``steady-state`` or ``modelled``), how old its inputs are,
and, when an input is missing, is ``None`` with the reason: never a made-up number.

Components never double count: ``ballooned``, ``reported``, ``free_resident`` and ``cache`` are
disjoint parts of guest RAM and their sum never exceeds it (guest statistics are untrusted and are
clamped to make that hold); ``reportable`` and ``stranded`` split ``free_resident``;
``reclaimable`` is derived from the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from daemon.guest_stats import GuestStats
from daemon.ledger.ranges import LedgerSummary, ReportingFacts
from daemon.model import MAX_PAGE_ORDER, extra_reportable, pageblock_order, upstream_report_time

Source = Literal["observed", "steady-state", "modelled"]
MiB = 1 << 20
SETTLE_SECONDS = 30.0  # upstream reports an idle guest fully in about 30 s (budget passes)
INEFFECTIVE_MIN_RISE = 64 * MiB  # free memory rise that working reporting would have returned
INEFFECTIVE_GRACE = 10.0  # seconds: reporting runs 2 s after a free, then per budget pass


@dataclass(frozen=True)
class Component:
    bytes: int | None
    source: Source
    age_seconds: float | None = None
    reason: str | None = None  # why bytes is None, or a caveat


@dataclass(frozen=True)
class Estimate:
    at: float
    ram_bytes: int | None
    margin_bytes: int
    reporting_enabled: bool | None
    reporting_effective: bool | None
    reporting_note: str | None
    components: dict[str, Component] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def what_if(self, order: int) -> WhatIf:
        """What reporting at ``order`` would change (see :func:`what_if`)."""
        return what_if(self, order)


@dataclass(frozen=True)
class Inputs:
    """Everything the estimate reads, gathered by the caller."""

    now: float
    ram_bytes: int | None
    balloon_actual: int | None
    balloon_problem: str | None
    reporting_enabled: bool | None
    stats: GuestStats | None
    stats_problem: str | None
    ledger: LedgerSummary | None
    host_problem: str | None
    facts: ReportingFacts | None  # over the last minute
    recent: ReportingFacts | None  # over the last SETTLE_SECONDS
    steady_stranded: int | None  # free_resident last seen when reporting had settled


def margin_for(ram_bytes: int | None, floor: int = 64 * MiB, fraction: float = 0.05) -> int:
    """Memory the guest keeps whatever the estimate: 5% of RAM, at least 64 MiB."""
    return max(floor, int((ram_bytes or 0) * fraction))


def reporting_effective(inputs: Inputs) -> tuple[bool | None, str | None]:
    """Whether reported pages are really discarded; None while it cannot be told yet."""
    if inputs.reporting_enabled is not True:
        return None, "free page reporting is not enabled on the balloon device"
    ledger, facts = inputs.ledger, inputs.facts
    if ledger is None or facts is None:
        return None, inputs.host_problem or "no host view yet"
    if ledger.discarded_bytes_total > 0:
        return True, None
    rise = facts.guest_free_rise_bytes or 0
    if rise >= INEFFECTIVE_MIN_RISE and facts.scans >= 3:
        return False, (
            f"guest free memory rose by {rise // MiB} MiB in {facts.window_seconds:.0f} s and the "
            "host discarded nothing: reports are acknowledged without effect (VFIO passthrough, "
            "page poisoning, postcopy) or reporting is not running"
        )
    return None, "no reported memory observed yet"


def estimate(inputs: Inputs) -> Estimate:
    """Compute every component from ``inputs``."""
    ram = inputs.ram_bytes
    margin = margin_for(ram)
    stats = inputs.stats if inputs.stats is not None and inputs.stats.valid else None
    stats_age = stats.age(inputs.now) if stats is not None else None
    ledger = inputs.ledger
    host_age = inputs.now - ledger.at if ledger is not None and ledger.at is not None else None
    c: dict[str, Component] = {}

    if ram is not None and inputs.balloon_actual is not None:
        c["ballooned"] = Component(max(0, ram - inputs.balloon_actual), "observed")
    else:
        c["ballooned"] = Component(None, "observed", reason=inputs.balloon_problem or "no balloon")

    ballooned = c["ballooned"].bytes or 0
    if ledger is not None:
        # A balloon inflated over already reported pages takes them without any page changing
        # state on the host: they are in the balloon now, so count them there only.
        reported = (
            ledger.reported_bytes if ram is None else min(ledger.reported_bytes, ram - ballooned)
        )
        c["reported"] = Component(reported, "observed", host_age)
    else:
        c["reported"] = Component(None, "observed", reason=inputs.host_problem or "no host view")

    free = stats.free_bytes if stats is not None else None
    no_stats = inputs.stats_problem or "no guest statistics"
    if free is None:
        c["free_resident"] = Component(None, "observed", reason=no_stats)
    elif ledger is None:
        c["free_resident"] = Component(
            None, "observed", reason=inputs.host_problem or "no host view"
        )
    else:
        # Free guest pages the host no longer backs: reported ones, and ones never backed.
        free_absent = min(free, ledger.reported_bytes + ledger.unattributed_bytes)
        resident = free - free_absent
        if ram is not None:  # untrusted stats: no more than the RAM left outside the other parts
            resident = min(resident, max(0, ram - ballooned - (c["reported"].bytes or 0)))
        c["free_resident"] = Component(resident, "observed", _oldest(stats_age, host_age))

    enabled = inputs.reporting_enabled
    effective, note = reporting_effective(inputs)
    free_resident = c["free_resident"].bytes
    if free_resident is None:
        reason = c["free_resident"].reason
        c["reportable"] = Component(None, "modelled", reason=reason)
        c["stranded"] = Component(None, "modelled", reason=reason)
    elif enabled is not True or effective is False:
        why = "free page reporting is off" if enabled is not True else "reporting is ineffective"
        c["reportable"] = Component(0, "observed", reason=why)
        c["stranded"] = Component(free_resident, "observed", reason=f"{why}: only a balloon helps")
    elif settled(inputs):
        c["reportable"] = Component(0, "steady-state")
        c["stranded"] = Component(free_resident, "steady-state", _age(inputs))
    elif inputs.steady_stranded is not None:
        stranded = min(free_resident, inputs.steady_stranded)
        c["reportable"] = Component(free_resident - stranded, "modelled", _age(inputs))
        c["stranded"] = Component(stranded, "modelled", _age(inputs))
    else:
        waiting = "reporting has not settled yet (about 30 s after the guest last freed memory)"
        c["reportable"] = Component(None, "modelled", reason=waiting)
        c["stranded"] = Component(None, "modelled", reason=waiting)

    available = stats.available_bytes if stats is not None else None
    if free is None or available is None:
        c["cache"] = Component(None, "observed", reason=no_stats)
    else:
        cache = max(0, available - free)
        if ram is not None:
            # Untrusted stats: never let the parts add up to more than the RAM.
            used = sum(x.bytes or 0 for k, x in c.items() if k in _DISJOINT and k != "cache")
            cache = min(cache, max(0, ram - used))
        c["cache"] = Component(cache, "observed", stats_age)

    if free_resident is None or c["cache"].bytes is None:
        c["reclaimable"] = Component(None, "modelled", reason=c["free_resident"].reason or no_stats)
    else:
        total = free_resident + c["cache"].bytes
        c["reclaimable"] = Component(
            max(0, total - margin),
            "modelled" if c["stranded"].source == "modelled" else "observed",
            _oldest(stats_age, host_age),
            reason=f"free resident memory and caches, less a margin of {margin // MiB} MiB",
        )
    return Estimate(inputs.now, ram, margin, enabled, effective, note, c)


_DISJOINT = ("ballooned", "reported", "free_resident", "cache")


def settled(inputs: Inputs) -> bool:
    """Reporting has caught up: nothing reported and no big free for SETTLE_SECONDS."""
    recent = inputs.recent
    if recent is None or recent.scans < 2:
        return False
    last = recent.last_reported_at
    quiet = last is None or inputs.now - last >= SETTLE_SECONDS
    return quiet and (recent.guest_free_rise_bytes or 0) < INEFFECTIVE_MIN_RISE


def _age(inputs: Inputs) -> float | None:
    ledger = inputs.ledger
    return inputs.now - ledger.at if ledger is not None and ledger.at is not None else None


def _oldest(*ages: float | None) -> float | None:
    known = [a for a in ages if a is not None]
    return max(known) if known else None


PAGE = 4096


@dataclass(frozen=True)
class WhatIf:
    """What another ``page_reporting_order`` would change, from the fitted free split."""

    order: int
    reporting_order: int
    extra_reportable_bytes: int | None
    pending_report_seconds: float | None  # until today's reportable memory is reported
    source: Source = "modelled"
    assumption: str = (
        "free memory below the reporting order is spread evenly over the smaller orders "
        "(the allocator model's default fit); reported and reportable memory sits at the "
        "reporting order"
    )
    reason: str | None = None


def what_if(result: Estimate, order: int, reporting_order: int = pageblock_order) -> WhatIf:
    """Memory that reporting at ``order`` would return beyond ``reporting_order``, and how long
    upstream reporting needs for what is pending now (capacity 32, budget, 2 s delay)."""
    comps = result.components
    stranded, reportable = comps["stranded"].bytes, comps["reportable"].bytes
    reported = comps["reported"].bytes
    if stranded is None or reportable is None or reported is None:
        missing = next(c.reason for c in (comps["stranded"], comps["reported"]) if c.reason)
        return WhatIf(order, reporting_order, None, None, reason=missing)
    by_order = [0] * (MAX_PAGE_ORDER + 1)
    below = stranded // PAGE
    for o in range(reporting_order):
        by_order[o] = below // reporting_order
    by_order[reporting_order] = (reported + reportable) // PAGE
    extra = extra_reportable(by_order, reporting_order, order) * PAGE
    block = PAGE << reporting_order
    pending = upstream_report_time(reportable // block, (reported + reportable) // block)
    return WhatIf(order, reporting_order, extra, pending)
