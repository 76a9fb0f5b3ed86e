from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.simguest.accuracy import (
    TOLERANCES,
    ErrorSeries,
    Estimated,
    TruthHistory,
    error,
    quantile,
)
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


def doc(
    at: float, ram: int = 1000, returned: list[int] | None = None, **components: int
) -> dict[str, Any]:
    names = ("reported", "free_resident", "reportable", "stranded")
    return {
        "time": at,
        "ram_bytes": ram,
        "components": {n: components.get(n, 0) for n in names},
        "returned_by_order_bytes": returned or [0] * 11,
    }


def test_errors_are_fractions_of_ram_and_missing_fails() -> None:
    truth = doc(0, reported=500, free_resident=100, stranded=50)
    good = Estimated(
        {"reported": 519, "free_resident": 71, "reportable": 30, "stranded": 41}, [0] * 11
    )
    assert error(good, truth, "reported") == pytest.approx(0.019)
    assert error(good, truth, "free_resident") == pytest.approx(0.029)
    assert error(good, truth, "what_if") == 0
    assert error(Estimated({"reported": None}, None), truth, "reported") is None
    assert error(Estimated({}, None), truth, "what_if") is None
    series = ErrorSeries()
    series.add(Estimated({"reported": None}, None), [truth])
    assert not any(m.ok for m in series.summary())
    assert set(TOLERANCES) == {m.component for m in series.summary()}


def test_what_if_error_is_the_worst_order() -> None:
    truth = doc(0, returned=[100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0])
    close = Estimated({}, [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0])
    off = Estimated({}, [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 35])
    assert error(close, truth, "what_if") == 0
    assert error(off, truth, "what_if") == pytest.approx(0.035)


def test_an_estimate_is_held_against_the_truths_of_its_window() -> None:
    history = TruthHistory(keep=10)
    for t, reported in ((0, 100), (1, 400), (2, 400), (20, 400)):
        history.add(doc(t, reported=reported))
    assert [t["time"] for t in history.samples] == [20]  # older than 10 s are gone
    history = TruthHistory(keep=10)
    for t, reported in ((0, 100), (1, 400), (2, 400)):
        history.add(doc(t, reported=reported))
    series = ErrorSeries(tolerances={"reported": 0.02})
    # Inputs of t=0 seen at t=2: within a window of 3 s the estimate matches a truth exactly.
    series.add(Estimated({"reported": 100}, None), history.window(-1, 2))
    series.add(Estimated({"reported": 100}, None), history.window(1, 2))  # window too late
    (m,) = series.summary()
    assert m.samples == 2 and m.max == pytest.approx(0.3) and not m.ok


def test_free_memory_never_touched_or_just_deflated_is_not_reported() -> None:
    pages = states()
    pages.touched[: PER_BLOCK // 2] = False  # half the free block was never written
    pages.deflated[PER_BLOCK // 2 : PER_BLOCK // 2 + 4] = True  # four pages a deflate gave back
    c = components(pages, reporting_order=9)
    assert c["untouched"] == PER_BLOCK // 2 * PAGE_SIZE
    assert c["reported"] == (PER_BLOCK // 2 - 4) * PAGE_SIZE


def test_quantile_is_nearest_rank() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0] * 9 + [50.0], 0.9) == 50.0
    with pytest.raises(ValueError):
        quantile([], 0.5)
