"""Balloon advice: stranded and cache only, never below used + margin, monotone in pressure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.guest_stats import GuestStats
from daemon.ledger.advice import (
    SWAP_IN_RATE,
    Advice,
    Pressure,
    PressureWatch,
    advise,
    pressure_signals,
)
from daemon.ledger.estimate import Component, Estimate, margin_for

MiB = 1 << 20
GiB = 1 << 30
SIGNALS = ("oom_kills", "alloc_stalls", "swap_in", "major_faults", "available_below_margin")


def make_estimate(
    ram: int, *, stranded: int, reportable: int, reported: int, cache: int, free_resident: int
) -> Estimate:
    c = {
        "stranded": Component(stranded, "modelled"),
        "reportable": Component(reportable, "modelled"),
        "reported": Component(reported, "observed"),
        "cache": Component(cache, "observed"),
        "free_resident": Component(free_resident, "observed"),
    }
    return Estimate(
        at=0.0,
        ram_bytes=ram,
        margin_bytes=margin_for(ram),
        reporting_enabled=True,
        reporting_effective=True,
        reporting_note=None,
        components=c,
    )


def guest(ram: int, used: int, free: int, cache: int) -> GuestStats:
    total = ram - 64 * MiB
    return GuestStats(
        last_update=100.0,
        total_bytes=total,
        free_bytes=free,
        available_bytes=total - used,
        disk_caches_bytes=cache,
    )


def advice_for(
    *,
    ram: int = 4 * GiB,
    used: int = 1 * GiB,
    stranded: int = 512 * MiB,
    reportable: int = 0,
    reported: int = 0,
    cache: int = 0,
    pressure: Pressure | None = None,
    minimum: int | None = None,
) -> Advice:
    free = stranded + reportable + reported
    stats = guest(ram, used, free, cache)
    est = make_estimate(
        ram,
        stranded=stranded,
        reportable=reportable,
        reported=reported,
        cache=cache,
        free_resident=stranded + reportable,
    )
    return advise(
        at=1.0,
        estimate=est,
        stats=stats,
        actual_bytes=ram,
        deflate_on_oom=False,
        pressure=pressure or Pressure(),
        minimum_bytes=minimum,
    )


def test_stranded_memory_is_taken_and_counted() -> None:
    a = advice_for(stranded=512 * MiB, reported=1 * GiB)
    assert a.action == "inflate"
    assert a.expected_gain_bytes == 512 * MiB
    assert a.target_bytes == 4 * GiB - 512 * MiB


def test_reported_and_reportable_memory_is_never_gain() -> None:
    a = advice_for(stranded=0, reportable=1 * GiB, reported=1 * GiB, cache=512 * MiB)
    assert a.expected_gain_bytes == 0
    assert a.target_bytes == 4 * GiB
    assert any("reporting returns it" in r for r in a.reasons)


def test_cache_is_taken_when_the_large_free_blocks_in_the_way_are_small() -> None:
    a = advice_for(stranded=100 * MiB, reported=50 * MiB, cache=1 * GiB)
    assert a.expected_gain_bytes > 100 * MiB
    assert a.target_bytes is not None and a.floor_bytes is not None
    assert a.target_bytes >= a.floor_bytes


def test_no_squeeze_under_pressure_and_the_advice_gives_memory_back() -> None:
    p = Pressure(signals=("swap_in",))
    a = advice_for(stranded=1 * GiB, pressure=p)
    assert a.expected_gain_bytes == 0
    assert a.action in ("deflate", "hold")
    assert a.target_bytes is not None and a.target_bytes >= 4 * GiB - 1


def test_configured_minimum_is_the_floor_when_higher() -> None:
    a = advice_for(stranded=2 * GiB, used=512 * MiB, minimum=3 * GiB)
    assert a.target_bytes == 3 * GiB
    assert a.floor_bytes == 3 * GiB


def test_missing_split_gives_no_advice_with_the_reason() -> None:
    est = make_estimate(GiB, stranded=0, reportable=0, reported=0, cache=0, free_resident=0)
    est.components["stranded"] = Component(None, "modelled", reason="no free split yet")
    a = advise(
        at=0,
        estimate=est,
        stats=guest(GiB, 0, 0, 0),
        actual_bytes=GiB,
        deflate_on_oom=False,
        pressure=Pressure(),
    )
    assert a.target_bytes is None and a.action == "none"
    assert a.reasons == ("no free split yet",)


def test_watch_turns_counters_into_rates_and_signals() -> None:
    watch = PressureWatch()
    base = GuestStats(last_update=10.0, swap_in_bytes=0, major_faults=0, available_bytes=GiB)
    assert not watch.observe(base, 64 * MiB).under
    later = GuestStats(
        last_update=12.0, swap_in_bytes=4 * SWAP_IN_RATE, major_faults=10, available_bytes=GiB
    )
    p = watch.observe(later, 64 * MiB)
    assert p.swap_in_bytes_per_second == 2 * SWAP_IN_RATE
    assert p.signals == ("swap_in",)
    # The same update again is the same window.
    assert watch.observe(later, 64 * MiB) == p


def test_watch_major_faults_count_only_above_their_baseline() -> None:
    watch = PressureWatch()
    faults = 0
    for t in range(10):  # a steady 1000 faults/s: a guest reading files
        faults += 1000
        p = watch.observe(GuestStats(last_update=float(t), major_faults=faults), 0)
        assert "major_faults" not in p.signals
    faults += 10_000
    p = watch.observe(GuestStats(last_update=10.0, major_faults=faults), 0)
    assert "major_faults" not in p.signals  # one fast window: a stamp rounding, or a blip
    faults += 10_000
    p = watch.observe(GuestStats(last_update=11.0, major_faults=faults), 0)
    assert "major_faults" in p.signals


sizes = st.integers(min_value=0, max_value=8 * GiB)


@st.composite
def cases(draw: st.DrawFn) -> dict[str, int]:
    ram = draw(st.integers(min_value=256, max_value=16 * 1024)) * MiB
    used = draw(st.integers(min_value=0, max_value=ram))
    stranded = draw(st.integers(min_value=0, max_value=ram))
    reportable = draw(st.integers(min_value=0, max_value=ram))
    reported = draw(st.integers(min_value=0, max_value=ram))
    cache = draw(st.integers(min_value=0, max_value=ram))
    actual = draw(st.integers(min_value=1, max_value=ram))
    minimum = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=ram)))
    return dict(
        ram=ram,
        used=used,
        stranded=stranded,
        reportable=reportable,
        reported=reported,
        cache=cache,
        actual=actual,
        minimum=-1 if minimum is None else minimum,
    )


def run_case(case: dict[str, int], signals: tuple[str, ...]) -> Advice:
    ram = case["ram"]
    est = make_estimate(
        ram,
        stranded=case["stranded"],
        reportable=case["reportable"],
        reported=case["reported"],
        cache=case["cache"],
        free_resident=case["stranded"] + case["reportable"],
    )
    stats = GuestStats(
        last_update=1.0,
        total_bytes=ram,
        available_bytes=ram - case["used"],
        free_bytes=case["stranded"] + case["reportable"] + case["reported"],
    )
    return advise(
        at=1.0,
        estimate=est,
        stats=stats,
        actual_bytes=case["actual"],
        deflate_on_oom=False,
        pressure=Pressure(signals=signals),
        minimum_bytes=None if case["minimum"] < 0 else case["minimum"],
    )


@given(cases(), st.sets(st.sampled_from(SIGNALS)))
def test_never_below_used_plus_margin_nor_the_minimum_unless_already_there(
    case: dict[str, int], signals: set[str]
) -> None:
    a = run_case(case, tuple(s for s in SIGNALS if s in signals))
    assert a.target_bytes is not None
    floor = min(case["ram"], max(case["used"] + margin_for(case["ram"]), max(case["minimum"], 0)))
    # The advice never squeezes: below the floor only where the balloon already is.
    assert a.target_bytes >= min(floor, case["actual"])
    assert a.target_bytes <= case["ram"]
    if a.target_bytes < case["actual"]:
        assert a.target_bytes >= floor


@given(cases())
def test_gain_is_only_stranded_and_cache_and_never_reported(case: dict[str, int]) -> None:
    a = run_case(case, ())
    assert a.target_bytes is not None
    grow = case["actual"] - a.target_bytes
    assert 0 <= a.expected_gain_bytes <= case["stranded"] + case["cache"]
    assert a.expected_gain_bytes <= max(0, grow)
    # What the balloon takes beyond its gain is large free blocks: at most the margin of them.
    swallowed = max(0, grow) - a.expected_gain_bytes
    assert swallowed <= min(case["reported"] + case["reportable"], margin_for(case["ram"]))


@given(cases(), st.sets(st.sampled_from(SIGNALS)), st.sets(st.sampled_from(SIGNALS)))
def test_monotone_in_pressure(case: dict[str, int], some: set[str], more: set[str]) -> None:
    less = run_case(case, tuple(s for s in SIGNALS if s in some))
    most = run_case(case, tuple(s for s in SIGNALS if s in some | more))
    assert less.target_bytes is not None and most.target_bytes is not None
    assert most.target_bytes >= less.target_bytes
    assert most.expected_gain_bytes <= less.expected_gain_bytes


def test_signals_in_a_fixed_order() -> None:
    s = pressure_signals(
        swap_in_rate=10 * SWAP_IN_RATE,
        major_rate=None,
        major_baseline=None,
        alloc_stalls=3,
        oom_kills=1,
        available=0,
        margin=1,
    )
    assert s == ("oom_kills", "alloc_stalls", "swap_in", "available_below_margin")
