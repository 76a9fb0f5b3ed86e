from __future__ import annotations

from daemon.model import (
    extra_reportable,
    fit_free,
    free_pages_by_order,
    replay_ranges,
    reportable_by_order,
    split_free,
    upstream_passes,
    upstream_report_time,
)
from daemon.model.checks import check_invariants

from .helpers import small_sim


def test_split_and_what_if_orders() -> None:
    by_order = [10, 0, 4, 0, 0, 32, 0, 0, 0, 512, 1024]
    split = split_free(by_order, 9)
    assert (split.reportable_pages, split.stranded_pages) == (1536, 46)
    assert reportable_by_order(by_order)[5] == 1568
    assert extra_reportable(by_order, 9, 5) == 32


def test_upstream_timing_matches_the_simulated_engine() -> None:
    # 256 unreported max-order blocks, nr_free 256: budget 1, 64 per pass, 4 passes of 2 s.
    assert upstream_passes(256, 256) == 4
    assert upstream_report_time(256, 256) == 8.0
    sim = small_sim(keep_log=True)
    sim.advance_to(8.0)
    assert len(sim.log.reported) == 256
    assert max(t for _, _, t in sim.log.reported) == upstream_report_time(256, 256)
    assert upstream_report_time(0, 100) == 0.0


def test_replay_and_fit_rebuild_an_observed_guest() -> None:
    ranges = [(4096, 9), (8192, 10), (9216, 9)]
    alloc = replay_ranges(65536, ranges, single_zone=True)
    check_invariants(alloc)
    assert free_pages_by_order(alloc).tolist()[9:] == [1024, 1024]
    fit = fit_free(alloc, free_pages=2048 + 3000, reporting_order=9, seed=1)
    check_invariants(alloc)
    assert fit.reported_pages == 2048
    assert sum(fit.by_order[:9]) == fit.placed_pages
    assert fit.placed_pages + fit.unplaced_pages == 3000
    assert fit.unplaced_pages < 300
