from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.simguest.accuracy import TOLERANCES, ErrorSeries, all_ok, compare, quantile, table
from daemon.simguest.truth import (
    BLOCK_BYTES,
    PAGE_SIZE,
    PageStates,
    components,
    document,
    read_truth_async,
    serve_truth,
)

PER_BLOCK = BLOCK_BYTES // PAGE_SIZE


def states() -> PageStates:
    """Two 2 MiB blocks: block 0 used then free order-9, block 1 small free pieces."""
    n = 2 * PER_BLOCK
    free = np.zeros(n, dtype=bool)
    used = np.zeros(n, dtype=bool)
    ballooned = np.zeros(n, dtype=bool)
    reported = np.zeros(n, dtype=bool)
    cache = np.zeros(n, dtype=bool)
    resident = np.zeros(n, dtype=bool)
    touched = np.ones(n, dtype=bool)
    deflated = np.zeros(n, dtype=bool)
    order = np.full(n, -1, dtype=np.int8)
    free[:PER_BLOCK] = True  # one free order-9 block ...
    order[:PER_BLOCK] = 9
    reported[:PER_BLOCK] = True  # ... reported, so the host dropped it
    free[PER_BLOCK : PER_BLOCK + 8] = True  # eight free order-0 pages the host still backs
    order[PER_BLOCK : PER_BLOCK + 8] = 0
    resident[PER_BLOCK:] = True
    ballooned[PER_BLOCK + 8 : PER_BLOCK + 16] = True
    resident[PER_BLOCK + 8 : PER_BLOCK + 16] = False
    used[PER_BLOCK + 16 :] = True
    cache[PER_BLOCK + 16 : PER_BLOCK + 32] = True
    return PageStates(free, used, ballooned, reported, cache, resident, touched, deflated, order)


def test_components_from_page_states() -> None:
    c = components(states(), reporting_order=9)
    assert c["reported"] == BLOCK_BYTES
    assert c["untouched"] == 0
    assert c["free_resident"] == c["stranded"] == 8 * PAGE_SIZE
    assert c["reportable"] == 0
    assert c["ballooned"] == 8 * PAGE_SIZE
    assert c["cache"] == 16 * PAGE_SIZE
    # At a lower reporting order the same small pieces become reportable.
    assert components(states(), reporting_order=0)["reportable"] == 8 * PAGE_SIZE


def test_document_counts_pages_per_block() -> None:
    doc = document(
        vm="a",
        pages=states(),
        reporting_order=9,
        balloon_target_bytes=1,
        balloon_actual_bytes=2,
        virtual_time=3.0,
        now=4.0,
    )
    assert doc["ram_bytes"] == 2 * BLOCK_BYTES
    assert doc["blocks"]["free"] == [PER_BLOCK, 8]
    assert doc["blocks"]["reported"] == [PER_BLOCK, 0]
    assert doc["blocks"]["resident"] == [0, PER_BLOCK - 8]


async def test_truth_socket_serves_one_document_per_connection(tmp_path: Path) -> None:
    calls = []

    def snapshot() -> dict[str, object]:
        calls.append(1)
        return {"format": 1, "n": len(calls)}

    path = tmp_path / "g.qmp.truth"
    server = await serve_truth(path, snapshot)
    try:
        assert (await read_truth_async(path))["n"] == 1
        assert (await read_truth_async(path))["n"] == 2
    finally:
        server.close()
        await server.wait_closed()


def truth_doc(**components: int) -> dict[str, object]:
    return {"ram_bytes": 1000, "components": components}


def test_accuracy_limits_are_fractions_of_ram() -> None:
    truth = truth_doc(reported=500, free_resident=100, stranded=50)
    good = compare({"reported": 519, "free_resident": 51, "stranded": 149}, truth)
    assert all_ok(good)
    assert [r.error_bytes for r in good] == [19, -49, 99]
    bad = compare({"reported": 521, "free_resident": 100, "stranded": 50}, truth)
    assert [r.ok for r in bad] == [False, True, True]
    assert bad[0].error_fraction == pytest.approx(0.021)


def test_a_missing_component_fails() -> None:
    results = compare({"reported": None}, truth_doc(reported=0, free_resident=0, stranded=0))
    assert not any(r.ok for r in results)
    assert "missing" in table([("case", results)])
    assert set(TOLERANCES) == {r.component for r in results}


def test_free_memory_never_touched_or_just_deflated_is_not_reported() -> None:
    pages = states()
    pages.touched[: PER_BLOCK // 2] = False  # half the free block was never written
    pages.deflated[PER_BLOCK // 2 : PER_BLOCK // 2 + 4] = True  # four pages a deflate gave back
    c = components(pages, reporting_order=9)
    assert c["untouched"] == PER_BLOCK // 2 * PAGE_SIZE
    assert c["reported"] == (PER_BLOCK // 2 - 4) * PAGE_SIZE


def test_error_series_splits_steady_samples_from_transients() -> None:
    series = ErrorSeries()
    truth = {"ram_bytes": 1000, "components": {"reported": 100, "free_resident": 0, "stranded": 0}}
    estimate = {"reported": 100, "free_resident": 0, "stranded": 0}
    assert not series.add(estimate, truth)  # nothing to compare with yet
    assert series.add(estimate, truth)
    moved = {**truth, "components": {"reported": 400, "free_resident": 0, "stranded": 0}}
    assert not series.add(estimate, moved)  # the truth jumped 30 % of RAM: a transient
    by_name = {s.component: s for s in series.summary()}
    reported = by_name["reported"]
    assert (reported.samples, reported.steady_samples) == (3, 1)
    assert reported.max == pytest.approx(0.3)
    assert reported.steady_p90 == 0.0
    assert reported.ok  # judged on the steady samples


def test_error_series_fails_a_component_that_is_ever_missing() -> None:
    series = ErrorSeries()
    truth = {"ram_bytes": 1000, "components": {"reported": 0, "free_resident": 0, "stranded": 0}}
    series.add({"reported": 0, "free_resident": 0, "stranded": 0}, truth)
    series.add({"reported": 0, "free_resident": None, "stranded": 0}, truth)
    by_name = {s.component: s for s in series.summary()}
    assert by_name["reported"].ok
    assert by_name["free_resident"].missing == 1 and not by_name["free_resident"].ok


def test_quantile_is_nearest_rank() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0] * 9 + [50.0], 0.9) == 50.0
    with pytest.raises(ValueError):
        quantile([], 0.5)
