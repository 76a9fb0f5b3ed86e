"""The per-VM reclaim estimate: how much the host got back, and how much more it could.

Inputs of one moment (the caller aligns them: guest stats, the host scan nearest to them, the
reconciled split of free memory from ``daemon.ledger.reconcile``) become components, each saying
where it came from: ``observed`` (QMP and the host view), ``agent`` (the guest's own free lists)
or ``modelled`` (the split replayed into the allocator model, with the fit's residual), how old
its inputs are and, when an input is missing, ``None`` with the reason: never a made-up number.

Components never double count: ``ballooned``, ``reported``, ``free_resident`` and ``cache`` are
disjoint parts of guest RAM and their sum never exceeds it (guest statistics are untrusted and
are clamped to make that hold); ``reportable`` and ``stranded`` split ``free_resident``;
``reclaimable`` is derived from the others. Reported memory is free memory the host no longer
backs, so it never exceeds the guest's free memory of the same moment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from daemon.guest_stats import GuestStats
from daemon.ledger.ranges import LedgerSummary
from daemon.ledger.reconcile import FreeState
from daemon.model import MAX_PAGE_ORDER, PAGE_SIZE

Source = Literal["observed", "agent", "modelled"]
MiB = 1 << 20
EFFECTIVE = {"effective": True, "slow": True, "stalled": False, "ineffective": False}


@dataclass(frozen=True)
class Component:
    bytes: int | None
    source: Source
    age_seconds: float | None = None
    reason: str | None = None  # why bytes is None, or a caveat
    residual_bytes: int | None = None  # modelled: how far the fit was off at its last check


@dataclass(frozen=True)
class OrderRow:
    """One order of the free split, and what reporting at that order would return."""

    order: int
    free_bytes: int  # free in blocks of exactly this order (reported ones included)
    returned_bytes: int  # resident free memory reporting at this order would return


@dataclass(frozen=True)
class WhatIf:
    """What another ``page_reporting_order`` would change, from the same split."""

    order: int
    reporting_order: int
    extra_reportable_bytes: int | None  # beyond what reporting at the guest's order returns
    pending_report_seconds: float | None  # until today's reportable memory is reported
    source: Source = "modelled"
    reason: str | None = None


@dataclass(frozen=True)
class Inputs:
    """The times of what the estimate read, epoch seconds."""

    stats_at: float | None
    host_at: float | None
    agent_at: float | None

    @property
    def skew_seconds(self) -> float | None:
        """How far apart the guest stats and the host scan used together are."""
        if self.stats_at is None or self.host_at is None:
            return None
        return abs(self.host_at - self.stats_at)


@dataclass(frozen=True)
class Estimate:
    at: float
    ram_bytes: int | None
    margin_bytes: int
    reporting_enabled: bool | None
    reporting_effective: bool | None
    reporting_note: str | None
    components: dict[str, Component] = field(default_factory=dict)
    verdict: str = "unknown"  # effective, slow, stalled, ineffective, off, unknown
    reporting_order: int | None = None
    pending_report_seconds: float | None = None  # until pending reportable memory is reported
    report_due_at: float | None = None  # when the last free will have been reported (predicted)
    by_order: tuple[OrderRow, ...] = ()
    inputs: Inputs = field(default_factory=lambda: Inputs(None, None, None))

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["inputs"]["skew_seconds"] = self.inputs.skew_seconds
        return body

    def what_if(self, order: int) -> WhatIf:
        """What reporting at ``order`` would return beyond the guest's own reporting order."""
        rows = {row.order: row for row in self.by_order}
        base = self.reporting_order
        if order not in rows or base is None:
            reason = self.components["stranded"].reason or "the free split is not known yet"
            return WhatIf(order, base or 0, None, None, reason=reason)
        now = rows[base].returned_bytes if base in rows else 0
        source = self.components["stranded"].source
        return WhatIf(
            order, base, rows[order].returned_bytes - now, self.pending_report_seconds, source
        )


def margin_for(ram_bytes: int | None, floor: int = 64 * MiB, fraction: float = 0.05) -> int:
    """Memory the guest keeps whatever the estimate: 5% of RAM, at least 64 MiB."""
    return max(floor, int((ram_bytes or 0) * fraction))


def estimate(
    *,
    now: float,
    ram_bytes: int | None,
    balloon_actual: int | None,
    balloon_problem: str | None,
    reporting_enabled: bool | None,
    stats: GuestStats | None,
    stats_problem: str | None,
    ledger: LedgerSummary | None,
    host_problem: str | None,
    free: FreeState | None,
    agent_at: float | None = None,
) -> Estimate:
    """Every component from inputs of one moment (``ledger`` is the scan nearest the stats)."""
    ram = ram_bytes
    margin = margin_for(ram)
    stats = stats if stats is not None and stats.valid else None
    stats_at = stats.last_update if stats is not None else None
    stats_age = stats.age(now) if stats is not None else None
    host_at = ledger.at if ledger is not None else None
    host_age = now - host_at if host_at is not None else None
    c: dict[str, Component] = {}

    if ram is not None and balloon_actual is not None:
        c["ballooned"] = Component(max(0, ram - balloon_actual), "observed")
    else:
        c["ballooned"] = Component(None, "observed", reason=balloon_problem or "no balloon")
    ballooned = c["ballooned"].bytes or 0

    free_bytes = stats.free_bytes if stats is not None else None
    no_stats = stats_problem or "no guest statistics"
    no_host = host_problem or "no host view"
    if ledger is None:
        c["reported"] = Component(None, "observed", reason=no_host)
    else:
        # A balloon inflated over already reported pages takes them without any page changing
        # state on the host: they are in the balloon now, so count them there only.
        reported = ledger.reported_bytes
        if ram is not None:
            reported = min(reported, max(0, ram - ballooned))
        caveat = None
        if free_bytes is not None and reported > free_bytes:
            # Reported pages are free pages: more than the guest has free means the scan and
            # the stats are of moments the guest allocated between.
            caveat = "capped at the guest's free memory (the scan and the stats are apart)"
            reported = free_bytes
        c["reported"] = Component(reported, "observed", host_age, caveat)

    if free_bytes is None:
        c["free_resident"] = Component(None, "observed", reason=no_stats)
    elif ledger is None:
        c["free_resident"] = Component(None, "observed", reason=no_host)
    else:
        # Free guest pages the host no longer backs: reported ones, and ones never backed.
        free_absent = min(free_bytes, ledger.reported_bytes + ledger.unattributed_bytes)
        resident = free_bytes - free_absent
        if ram is not None:  # untrusted stats: no more than the RAM left outside the other parts
            resident = min(resident, max(0, ram - ballooned - (c["reported"].bytes or 0)))
        c["free_resident"] = Component(resident, "observed", _oldest(stats_age, host_age))

    verdict, note, order = _reporting(reporting_enabled, free)
    _split_free(c, free, verdict, now)

    available = stats.available_bytes if stats is not None else None
    if free_bytes is None or available is None:
        c["cache"] = Component(None, "observed", reason=no_stats)
    else:
        cache = max(0, available - free_bytes)
        if ram is not None:
            # Untrusted stats: never let the parts add up to more than the RAM.
            used = sum(x.bytes or 0 for k, x in c.items() if k in _DISJOINT and k != "cache")
            cache = min(cache, max(0, ram - used))
        c["cache"] = Component(cache, "observed", stats_age)

    free_resident = c["free_resident"].bytes
    if free_resident is None or c["cache"].bytes is None:
        c["reclaimable"] = Component(None, "observed", reason=c["free_resident"].reason or no_stats)
    else:
        total = free_resident + c["cache"].bytes
        c["reclaimable"] = Component(
            max(0, total - margin),
            "observed",
            _oldest(stats_age, host_age),
            reason=f"free resident memory and caches, less a margin of {margin // MiB} MiB",
        )
    return Estimate(
        at=now,
        ram_bytes=ram,
        margin_bytes=margin,
        reporting_enabled=reporting_enabled,
        reporting_effective=EFFECTIVE.get(verdict),
        reporting_note=note,
        components=c,
        verdict=verdict,
        reporting_order=order,
        pending_report_seconds=_pending_seconds(free, now),
        report_due_at=free.report_due_at if free is not None else None,
        by_order=_by_order(free, c["free_resident"].bytes, free_bytes, ledger),
        inputs=Inputs(stats_at, host_at, agent_at),
    )


_DISJOINT = ("ballooned", "reported", "free_resident", "cache")


def _reporting(enabled: bool | None, free: FreeState | None) -> tuple[str, str | None, int | None]:
    """The verdict on free page reporting, its evidence, and the guest's reporting order."""
    if enabled is not True:
        return "off", "free page reporting is not enabled on the balloon device", None
    if free is None:
        return "unknown", "no host view yet", None
    if free.reporting_order > MAX_PAGE_ORDER:
        return "off", "the guest has no reporting device registered", None
    return free.verdict, free.evidence, free.reporting_order


def _split_free(c: dict[str, Component], free: FreeState | None, verdict: str, now: float) -> None:
    """``reportable`` and ``stranded``: the parts of free resident memory above and below the
    reporting order."""
    resident = c["free_resident"].bytes
    if resident is None:
        reason = c["free_resident"].reason
        c["reportable"] = Component(None, "modelled", reason=reason)
        c["stranded"] = Component(None, "modelled", reason=reason)
        return
    if verdict in ("off", "ineffective"):
        why = "free page reporting is off" if verdict == "off" else "reporting is ineffective"
        c["reportable"] = Component(0, "observed", reason=why)
        c["stranded"] = Component(resident, "observed", reason=f"{why}: only a balloon helps")
        return
    if free is None:
        c["reportable"] = Component(None, "modelled", reason="no free split yet")
        c["stranded"] = Component(None, "modelled", reason="no free split yet")
        return
    reportable = min(resident, free.pending_pages * PAGE_SIZE)
    source: Source = "agent" if free.source == "agent" else "modelled"
    residual = free.residual_pages * PAGE_SIZE if free.residual_pages is not None else None
    age = now - free.at
    c["reportable"] = Component(reportable, source, age, residual_bytes=residual)
    c["stranded"] = Component(resident - reportable, source, age, residual_bytes=residual)


def _by_order(
    free: FreeState | None,
    resident: int | None,
    free_bytes: int | None,
    ledger: LedgerSummary | None,
) -> tuple[OrderRow, ...]:
    """Per order: the split, and what reporting at that order returns of the resident free
    memory (all free blocks that large, less what the host already has back). Never negative,
    never more than the free resident memory, and smaller the higher the order."""
    if free is None or resident is None or free_bytes is None or ledger is None:
        return ()
    pages = free.by_order_pages
    absent = min(free_bytes, ledger.reported_bytes + ledger.unattributed_bytes)
    rows = []
    for order in range(len(pages)):
        big = sum(pages[order:]) * PAGE_SIZE
        rows.append(OrderRow(order, pages[order] * PAGE_SIZE, min(resident, max(0, big - absent))))
    return tuple(rows)


def _pending_seconds(free: FreeState | None, now: float) -> float | None:
    if free is None or free.pending_pages == 0:
        return 0.0 if free is not None else None
    if free.report_due_at is None:
        return None
    return max(0.0, free.report_due_at - now)


def _oldest(*ages: float | None) -> float | None:
    known = [a for a in ages if a is not None]
    return max(known) if known else None
