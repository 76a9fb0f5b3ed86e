"""The reclaim estimate: sources, reasons for missing inputs, no double counting, what-if."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from daemon.guest_stats import GuestStats
from daemon.ledger.estimate import Estimate, estimate
from daemon.ledger.ranges import LedgerSummary
from daemon.ledger.reconcile import FreeState
from daemon.model.constants import NR_PAGE_ORDERS, PAGE_SIZE

MiB = 1 << 20
RAM = 1024 * MiB
NOW = 1_000_000.0


def summary(reported: int = 0, unattributed: int = 0, discarded_total: int = 0) -> LedgerSummary:
    return LedgerSummary(
        at=NOW - 1,
        scans=10,
        covered_bytes=RAM,
        backed_bytes=RAM - reported - unattributed,
        resident_bytes=RAM - reported - unattributed,
        reported_bytes=reported,
        ballooned_bytes=0,
        unexplained_bytes=0,
        unattributed_bytes=unattributed,
        reported_bytes_total=discarded_total,
        discarded_bytes_total=discarded_total,
        ballooned_bytes_total=0,
        unexplained_bytes_total=0,
        refaulted_bytes_total=0,
        refaulted_reported_bytes_total=0,
        first_touch_bytes_total=0,
        ranges_total=0,
        last_reported_at=None,
    )


def split_of(small: int, big: int, order: int = 9) -> tuple[int, ...]:
    """Free pages per order: ``small`` bytes spread evenly below ``order``, ``big`` at 10."""
    pages = [0] * 11
    for o in range(order):
        pages[o] = small // PAGE_SIZE // order
    pages[0] += small // PAGE_SIZE - sum(pages)
    pages[10] = big // PAGE_SIZE
    return tuple(pages)


def free_state(
    small: int = 200 * MiB,
    big: int = 300 * MiB,
    pending: int = 0,
    verdict: str = "effective",
    source: str = "modelled",
) -> FreeState:
    return FreeState(
        at=NOW - 1,
        source=source,  # type: ignore[arg-type]
        by_order_pages=split_of(small, big),
        reporting_order=9,
        residual_pages=1024,
        residual_at=NOW - 30,
        agent_skew_seconds=None,
        pending_pages=pending // PAGE_SIZE,
        pending_since=NOW - 2 if pending else None,
        report_due_at=NOW + 2 if pending else None,
        verdict=verdict,  # type: ignore[arg-type]
        evidence="predicted 300 MiB reported 2 s after the guest freed it; the host saw 300 MiB",
    )


def estimated(**kw: object) -> Estimate:
    base: dict[str, object] = dict(
        now=NOW,
        ram_bytes=RAM,
        balloon_actual=RAM,
        balloon_problem=None,
        reporting_enabled=True,
        stats=GuestStats(
            last_update=NOW - 1,
            free_bytes=500 * MiB,
            total_bytes=1000 * MiB,
            available_bytes=700 * MiB,
        ),
        stats_problem=None,
        ledger=summary(reported=300 * MiB, discarded_total=300 * MiB),
        host_problem=None,
        free=free_state(),
    )
    base.update(kw)
    return estimate(**base)  # type: ignore[arg-type]


def test_observed_components() -> None:
    e = estimated()
    c = {k: v.bytes for k, v in e.components.items()}
    assert c["ballooned"] == 0 and c["reported"] == 300 * MiB
    assert c["free_resident"] == 200 * MiB and c["cache"] == 200 * MiB
    assert c["reportable"] == 0 and c["stranded"] == 200 * MiB
    assert c["reclaimable"] == 400 * MiB - e.margin_bytes
    assert e.components["stranded"].source == "modelled"
    assert e.components["stranded"].residual_bytes == 1024 * PAGE_SIZE
    assert e.verdict == "effective" and e.reporting_effective is True
    assert e.inputs.stats_at == NOW - 1 and e.inputs.skew_seconds == 0


def test_pending_memory_is_reportable_until_reporting_returns_it() -> None:
    e = estimated(
        ledger=summary(reported=100 * MiB),
        free=free_state(big=300 * MiB, pending=200 * MiB),
    )
    assert e.components["free_resident"].bytes == 400 * MiB
    assert e.components["reportable"].bytes == 200 * MiB
    assert e.components["stranded"].bytes == 200 * MiB
    assert e.pending_report_seconds == 2.0


def test_the_agent_is_named_as_the_source() -> None:
    e = estimated(free=free_state(source="agent"))
    assert e.components["reportable"].source == "agent"
    assert e.components["stranded"].source == "agent"


def test_reporting_off_or_ineffective_strands_everything() -> None:
    for e in (
        estimated(reporting_enabled=False),
        estimated(free=free_state(verdict="ineffective")),
    ):
        assert e.components["reportable"].bytes == 0
        assert e.components["stranded"].bytes == 200 * MiB
        assert e.components["stranded"].source == "observed"
    assert estimated(reporting_enabled=False).verdict == "off"
    assert estimated(free=free_state(verdict="ineffective")).reporting_effective is False


def test_reported_never_exceeds_free_memory_of_the_same_moment() -> None:
    # The guest allocated between the scan and the stats: 300 MiB reported, 200 MiB free.
    stats = GuestStats(last_update=NOW - 1, free_bytes=200 * MiB, available_bytes=250 * MiB)
    e = estimated(stats=stats)
    assert e.components["reported"].bytes == 200 * MiB
    assert "capped" in (e.components["reported"].reason or "")
    assert e.components["free_resident"].bytes == 0


def test_missing_inputs_are_null_with_reasons() -> None:
    e = estimated(
        stats=None,
        stats_problem="guest has not reported statistics yet",
        ledger=None,
        host_problem="no_permission: permission denied",
        balloon_actual=None,
        balloon_problem="no virtio-balloon device",
        free=None,
    )
    for name, comp in e.components.items():
        assert comp.bytes is None, name
        assert comp.reason, name
    assert "permission" in (e.components["reported"].reason or "")
    assert "statistics" in (e.components["cache"].reason or "")
    assert e.by_order == () and e.what_if(5).extra_reportable_bytes is None


def test_rejected_stats_are_not_used() -> None:
    bad = GuestStats(last_update=NOW, valid=False, problems=("free > total",))
    e = estimated(stats=bad, stats_problem="rejected: free > total")
    assert e.components["free_resident"].bytes is None
    assert "rejected" in (e.components["free_resident"].reason or "")


def test_what_if_every_order_from_the_split() -> None:
    e = estimated()  # 200 MiB spread over orders 0..8, 300 MiB at 10 (all reported)
    rows = {r.order: r for r in e.by_order}
    assert [r.order for r in e.by_order] == list(range(11))
    assert rows[9].returned_bytes == rows[10].returned_bytes == 0  # reported already
    assert rows[0].returned_bytes == 200 * MiB  # at order 0, all free memory is reportable
    assert abs(rows[5].returned_bytes - 200 * MiB * 4 / 9) < 8 * PAGE_SIZE
    lower = e.what_if(5)
    assert lower.extra_reportable_bytes == rows[5].returned_bytes
    assert e.what_if(9).extra_reportable_bytes == 0


sizes = st.integers(min_value=0, max_value=4 * RAM)
split_pages = st.lists(
    st.integers(min_value=0, max_value=RAM // PAGE_SIZE),
    min_size=NR_PAGE_ORDERS,
    max_size=NR_PAGE_ORDERS,
)


@given(
    actual=st.integers(min_value=0, max_value=RAM),
    free=sizes,
    available=sizes,
    reported=sizes,
    unattributed=sizes,
    pages=split_pages,
    pending=sizes,
    enabled=st.none() | st.booleans(),
    verdict=st.sampled_from(["effective", "slow", "stalled", "ineffective", "unknown"]),
)
def test_components_never_double_count_and_what_if_stays_within_free_resident(
    actual: int,
    free: int,
    available: int,
    reported: int,
    unattributed: int,
    pages: list[int],
    pending: int,
    enabled: bool | None,
    verdict: str,
) -> None:
    reported = min(reported, RAM)
    unattributed = min(unattributed, RAM - reported)
    stats = GuestStats(last_update=NOW, free_bytes=free, available_bytes=available)
    state = replace(free_state(pending=pending, verdict=verdict), by_order_pages=tuple(pages))
    e = estimated(
        balloon_actual=actual,
        stats=stats,
        reporting_enabled=enabled,
        ledger=summary(reported, unattributed),
        free=state,
    )
    c = {k: v.bytes for k, v in e.components.items()}
    parts = [c[k] or 0 for k in ("ballooned", "reported", "free_resident", "cache")]
    assert all(p >= 0 for p in parts)
    assert sum(parts) <= RAM
    assert (c["reported"] or 0) <= free
    if c["reportable"] is not None and c["stranded"] is not None:
        assert c["reportable"] >= 0 and c["stranded"] >= 0
        assert c["reportable"] + c["stranded"] == c["free_resident"]
    if c["reclaimable"] is not None:
        assert 0 <= c["reclaimable"] <= (c["free_resident"] or 0) + (c["cache"] or 0)
    returned = [r.returned_bytes for r in e.by_order]
    assert returned == sorted(returned, reverse=True)  # monotone in the order
    assert all(0 <= r <= (c["free_resident"] or 0) for r in returned)
