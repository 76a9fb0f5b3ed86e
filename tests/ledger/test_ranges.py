"""The per-VM ledger on synthetic scans: ranges, counters, refaults, balloon, facts."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.host.mtree import FlatRange, GuestPhysMap
from daemon.ledger.ranges import SUMMARIES_KEPT, Ledger, LedgerSummary, ReportedRange
from tests.ledger.synthetic import scan

MiB = 1 << 20
N = 8192  # 32 MiB of guest RAM


def _components(s: LedgerSummary) -> int:
    return (
        s.backed_bytes
        + s.reported_bytes
        + s.ballooned_bytes
        + s.unexplained_bytes
        + s.unattributed_bytes
    )


def test_first_scan_is_a_baseline() -> None:
    pages = np.zeros(N, dtype=bool)
    pages[:100] = True
    ledger = Ledger()
    obs = ledger.observe(scan(10.0, ram=pages))
    assert not obs.changed and obs.ranges == ()
    s = ledger.summary()
    assert (s.scans, s.at, s.covered_bytes) == (1, 10.0, N * 4096)
    assert s.backed_bytes == 100 * 4096 and s.unattributed_bytes == (N - 100) * 4096
    assert s.reported_bytes_total == 0


def test_reported_ranges_with_offsets_and_guest_addresses() -> None:
    gpa = GuestPhysMap([FlatRange(0x1_0000_0000, N * 4096, "ram", "ram", 0)])
    ledger = Ledger(gpa_map=gpa)
    full = np.ones(N, dtype=bool)
    ledger.observe(scan(1.0, ram=full))
    freed = full.copy()
    freed[1024:2048] = False
    freed[2560:3072] = False
    obs = ledger.observe(scan(2.0, ram=freed))
    assert obs.ranges == (
        ReportedRange(2.0, "ram", 4 * MiB, 4 * MiB, 10, 0x1_0000_0000 + 4 * MiB, 4 * MiB),
        ReportedRange(2.0, "ram", 10 * MiB, 2 * MiB, 9, 0x1_0000_0000 + 10 * MiB, 2 * MiB),
    )
    assert obs.reported == obs.discarded == 6 * MiB
    s = ledger.summary()
    assert s.reported_bytes == s.reported_bytes_total == 6 * MiB
    assert s.ranges_total == 2 and s.last_reported_at == 2.0
    assert _components(s) == s.covered_bytes


def test_refault_of_reported_memory() -> None:
    ledger = Ledger()
    full = np.ones(N, dtype=bool)
    ledger.observe(scan(1.0, ram=full))
    freed = full.copy()
    freed[0:1024] = False
    ledger.observe(scan(2.0, ram=freed))
    reused = freed.copy()
    reused[0:100] = True
    obs = ledger.observe(scan(3.0, ram=reused))
    assert obs.refaulted == 100 * 4096 and obs.first_touch == 0
    s = ledger.summary()
    assert s.reported_bytes == 924 * 4096
    assert s.refaulted_bytes_total == s.refaulted_reported_bytes_total == 100 * 4096
    assert s.reported_bytes_total == 1024 * 4096  # a counter: it does not go down


def test_first_touch_is_not_a_refault() -> None:
    ledger = Ledger()
    pages = np.zeros(N, dtype=bool)
    ledger.observe(scan(1.0, ram=pages))
    pages[:50] = True
    obs = ledger.observe(scan(2.0, ram=pages))
    assert obs.first_touch == 50 * 4096 and obs.refaulted == 0
    assert ledger.summary().refaulted_bytes_total == 0


def test_balloon_inflation_is_ballooned() -> None:
    ledger = Ledger()
    full = np.ones(N, dtype=bool)
    ledger.observe(scan(1.0, ram=full), balloon_actual=32 * MiB)
    taken = full.copy()
    taken[0:2048] = False  # 8 MiB, aligned: looks like reports, but the balloon grew by 8 MiB
    obs = ledger.observe(scan(2.0, ram=taken), balloon_actual=24 * MiB)
    assert obs.balloon_grew == 8 * MiB and obs.ballooned == 8 * MiB
    assert obs.ranges == () and obs.reported == 0
    s = ledger.summary()
    assert s.ballooned_bytes == s.ballooned_bytes_total == 8 * MiB and s.reported_bytes == 0
    # Deflation explains nothing; a later report is a report again.
    freed = taken.copy()
    freed[4096:5120] = False
    obs = ledger.observe(scan(3.0, ram=freed), balloon_actual=32 * MiB)
    assert obs.balloon_grew == 0 and obs.reported == 4 * MiB


def test_unexplained_absences_are_counted_apart() -> None:
    ledger = Ledger()
    full = np.ones(N, dtype=bool)
    ledger.observe(scan(1.0, ram=full))
    holes = full.copy()
    holes[100:200:2] = False
    obs = ledger.observe(scan(2.0, ram=holes))
    assert obs.unexplained == 50 * 4096 and obs.reported == 0
    assert ledger.summary().unexplained_bytes == 50 * 4096


def test_larger_block_over_reported_pages_counts_only_new_pages() -> None:
    ledger = Ledger()
    full = np.ones(N, dtype=bool)
    ledger.observe(scan(1.0, ram=full))
    half = full.copy()
    half[0:512] = False
    ledger.observe(scan(2.0, ram=half))
    merged = half.copy()
    merged[512:1024] = False  # the buddy: now the whole order-10 block is reported
    obs = ledger.observe(scan(3.0, ram=merged))
    assert [(r.offset, r.order, r.discarded) for r in obs.ranges] == [(0, 10, 2 * MiB)]
    assert obs.reported == 2 * MiB
    s = ledger.summary()
    assert s.reported_bytes == s.reported_bytes_total == 4 * MiB


def test_history_is_bounded_and_filterable() -> None:
    ledger = Ledger(history=3)
    pages = np.ones(N, dtype=bool)
    ledger.observe(scan(0.0, ram=pages))
    for i in range(5):
        pages = pages.copy()
        pages[i * 512 : (i + 1) * 512] = False
        ledger.observe(scan(float(i + 1), ram=pages))
    kept = ledger.history.query()
    assert len(kept) == 3 and ledger.summary().ranges_total >= 5
    assert [r.at for r in kept] == sorted(r.at for r in kept)
    assert all(r.at > 3.0 for r in ledger.history.query(since=3.0))
    assert ledger.history.query(limit=1) == kept[-1:]


def test_resized_block_starts_over() -> None:
    ledger = Ledger()
    ledger.observe(scan(1.0, ram=np.ones(N, dtype=bool)))
    obs = ledger.observe(scan(2.0, ram=np.zeros(2 * N, dtype=bool)))
    assert not obs.changed
    assert ledger.summary().covered_bytes == 2 * N * 4096


def test_several_blocks() -> None:
    ledger = Ledger()
    a, b = np.ones(N, dtype=bool), np.ones(N, dtype=bool)
    ledger.observe(scan(1.0, a=a, b=b))
    b2 = b.copy()
    b2[512:1024] = False
    obs = ledger.observe(scan(2.0, a=a, b=b2))
    assert [(r.block, r.offset) for r in obs.ranges] == [("b", 2 * MiB)]
    assert ledger.summary().covered_bytes == 2 * N * 4096


def test_summaries_of_recent_scans_match_inputs_of_their_moment() -> None:
    ledger = Ledger()
    pages = np.ones(N, dtype=bool)
    ledger.observe(scan(100.0, ram=pages))
    freed = pages.copy()
    freed[:1024] = False
    ledger.observe(scan(101.0, ram=freed))
    ledger.observe(scan(102.0, ram=freed))
    assert ledger.summary().at == 102.0 and ledger.summary().reported_bytes == 4 * MiB
    assert ledger.summary_near(100.2).at == 100.0
    assert ledger.summary_near(100.2).reported_bytes == 0  # before the block was reported
    assert ledger.summary_near(100.8).at == 101.0
    for t in range(103, 103 + SUMMARIES_KEPT):
        ledger.observe(scan(float(t), ram=freed))
    assert ledger.summary_near(0.0).at == 103.0  # only the last few are kept


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 8))
def test_components_never_double_count(seed: int, steps: int) -> None:
    """Backed, reported, ballooned, unexplained and unattributed partition the RAM, always."""
    rng = np.random.default_rng(seed)
    n = 4096
    ledger = Ledger(min_order=int(rng.integers(0, 10)))
    pages = rng.random(n) < 0.8
    actual = 64 * MiB
    totals_before = None
    for step in range(steps):
        ledger.observe(scan(float(step), ram=pages), balloon_actual=actual)
        s = ledger.summary()
        parts = (s.backed_bytes, s.reported_bytes, s.ballooned_bytes, s.unexplained_bytes)
        assert min(parts) >= 0 and s.unattributed_bytes >= 0
        assert _components(s) == s.covered_bytes == n * 4096
        totals = (
            s.reported_bytes_total,
            s.discarded_bytes_total,
            s.ballooned_bytes_total,
            s.refaulted_bytes_total,
            s.first_touch_bytes_total,
        )
        if totals_before is not None:
            assert all(a >= b for a, b in zip(totals, totals_before, strict=True))
        totals_before = totals
        pages = pages.copy()
        for _ in range(int(rng.integers(0, 4))):
            order = int(rng.integers(0, 11))
            start = int(rng.integers(0, n >> order)) << order
            pages[start : start + (1 << order)] = False
        pages ^= rng.random(n) < 0.02
        actual -= int(rng.integers(0, 3)) * 64 * 4096
