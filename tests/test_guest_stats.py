"""Parsing of ``qom-get ... guest-stats`` replies: untrusted guest input."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.guest_stats import (
    FUTURE_TOLERANCE_S,
    MAX_UNKNOWN,
    MAX_VALUE,
    STATS,
    UNSET,
    GuestStats,
    format_guest_stats,
    parse_guest_stats,
)

STAT_FIELDS = {s.qmp: s.field for s in STATS}
COUNTER_FIELDS = tuple(s.field for s in STATS if s.kind == "counter")

GiB = 1 << 30
MiB = 1 << 20
NOW = 1_760_000_000.0
RAM = 512 * MiB

# Shaped like a reply from QEMU 7.2 for a 512 MiB Debian 12 guest a few seconds after boot.
QEMU_7_2: dict[str, Any] = {
    "stats": {
        "stat-swap-in": 0,
        "stat-swap-out": 0,
        "stat-major-faults": 231,
        "stat-minor-faults": 51_874,
        "stat-free-memory": 433_737_728,
        "stat-total-memory": 497_373_184,
        "stat-available-memory": 438_910_976,
        "stat-disk-caches": 24_272_896,
        "stat-htlb-pgalloc": 0,
        "stat-htlb-pgfail": 0,
    },
    "last-update": 1_759_999_998,
}

QEMU_9_2: dict[str, Any] = {
    "stats": {
        **QEMU_7_2["stats"],
        "stat-oom-kills": 1,
        "stat-alloc-stalls": 17,
        "stat-async-scans": 52_985_856,
        "stat-direct-scans": 4_194_304,
        "stat-async-reclaims": 41_943_040,
        "stat-direct-reclaims": 2_097_152,
    },
    "last-update": 1_759_999_998,
}

NEW_IN_9_2 = (
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
)


def reply(last_update: int = 1_759_999_998, **stats: int | object) -> dict[str, Any]:
    """A 9.2-shaped reply from QEMU_9_2 with some stats replaced (stat_free_memory=...)."""
    values = dict(QEMU_9_2["stats"])
    for key, value in stats.items():
        values[key.replace("_", "-")] = value
    return {"stats": values, "last-update": last_update}


def test_qemu_7_2_reply_maps_every_stat() -> None:
    stats = parse_guest_stats(QEMU_7_2, ram_bytes=RAM, now=NOW)
    assert stats.valid, stats.problems
    assert stats.problems == ()
    assert stats.last_update == 1_759_999_998.0
    assert stats.available
    assert stats.age(NOW) == 2.0
    assert stats.swap_in_bytes == 0
    assert stats.swap_out_bytes == 0
    assert stats.major_faults == 231
    assert stats.minor_faults == 51_874
    assert stats.free_bytes == 433_737_728
    assert stats.total_bytes == 497_373_184
    assert stats.available_bytes == 438_910_976
    assert stats.disk_caches_bytes == 24_272_896
    assert stats.hugetlb_allocations == 0
    assert stats.hugetlb_failures == 0
    for name in NEW_IN_9_2:
        assert getattr(stats, name) is None, name
    assert stats.unknown == {}


def test_qemu_9_2_reply_maps_the_six_newer_stats() -> None:
    stats = parse_guest_stats(QEMU_9_2, ram_bytes=RAM, now=NOW)
    assert stats.valid, stats.problems
    assert (
        stats.oom_kills,
        stats.alloc_stalls,
        stats.async_scans,
        stats.direct_scans,
        stats.async_reclaims,
        stats.direct_reclaims,
    ) == (1, 17, 52_985_856, 4_194_304, 41_943_040, 2_097_152)
    assert stats.free_bytes == 433_737_728


def test_first_reply_before_any_update_is_unavailable_not_zero() -> None:
    first = {"stats": {name: UNSET for name in STAT_FIELDS}, "last-update": 0}
    stats = parse_guest_stats(first, ram_bytes=RAM, now=NOW)
    assert stats.valid
    assert not stats.available
    assert stats.last_update is None
    assert stats.age(NOW) is None
    for name in STAT_FIELDS.values():
        assert getattr(stats, name) is None, name
    assert stats == GuestStats()


def test_stats_the_guest_does_not_send_stay_unavailable_after_updates() -> None:
    # A guest kernel without CONFIG_HUGETLB_PAGE never sends the htlb stats.
    stats = parse_guest_stats(
        reply(stat_htlb_pgalloc=UNSET, stat_htlb_pgfail=UNSET), ram_bytes=RAM, now=NOW
    )
    assert stats.valid
    assert stats.hugetlb_allocations is None
    assert stats.hugetlb_failures is None
    assert stats.free_bytes == 433_737_728


def test_stat_table_covers_every_counter_and_size_field() -> None:
    int_fields = [f.name for f in dataclasses.fields(GuestStats) if f.type == "int | None"]
    assert [s.field for s in STATS] == int_fields
    assert len(STATS) == 16 and len(set(STAT_FIELDS)) == 16
    assert {s.metric for s in STATS} == {s.metric for s in STATS if s.metric.startswith("qemu_")}
    assert len({s.metric for s in STATS}) == 16
    assert [s.qmp for s in STATS if s.since <= (7, 2)][-2:] == [
        "stat-htlb-pgalloc",
        "stat-htlb-pgfail",
    ]


def test_format_knows_only_what_a_qemu_version_reports() -> None:
    stats = parse_guest_stats(QEMU_9_2, now=NOW)
    old = format_guest_stats(stats, since=(7, 2))
    assert list(old["stats"]) == list(QEMU_7_2["stats"])
    assert parse_guest_stats(old, now=NOW).oom_kills is None


# -- impossible and malformed replies --------------------------------------------------------

IMPOSSIBLE = [
    # (reply, ram_bytes, expected problem text, fields that must not be served)
    (
        reply(stat_free_memory=2 * GiB, stat_total_memory=1 * GiB),
        None,
        "free 2.0 GiB > total 1.0 GiB",
        ("free_bytes", "total_bytes"),
    ),
    (
        reply(stat_free_memory=RAM + 1, stat_total_memory=RAM),
        None,
        "free 512.0 MiB > total 512.0 MiB",
        ("free_bytes", "total_bytes"),
    ),
    (
        reply(stat_available_memory=600 * MiB, stat_total_memory=500 * MiB),
        None,
        "available 600.0 MiB > total 500.0 MiB",
        ("available_bytes", "total_bytes"),
    ),
    (
        reply(stat_disk_caches=3 * GiB, stat_total_memory=2 * GiB),
        None,
        "disk-caches 3.0 GiB > total 2.0 GiB",
        ("disk_caches_bytes", "total_bytes"),
    ),
    (
        reply(stat_total_memory=1 * GiB, stat_free_memory=1, stat_available_memory=1),
        RAM,
        "total 1.0 GiB > VM RAM 512.0 MiB",
        ("total_bytes",),
    ),
    (
        reply(stat_total_memory=UNSET, stat_free_memory=1 * GiB),
        RAM,
        "free 1.0 GiB > VM RAM 512.0 MiB",
        ("free_bytes",),
    ),
    (reply(stat_swap_in=-1), RAM, "stat-swap-in is negative: -1", ("swap_in_bytes",)),
    (
        reply(stat_minor_faults=MAX_VALUE + 1),
        RAM,
        f"stat-minor-faults is impossibly large: {MAX_VALUE + 1}",
        ("minor_faults",),
    ),
    (
        reply(stat_major_faults=UNSET - 1),
        RAM,
        "stat-major-faults is impossibly large",
        ("major_faults",),
    ),
    (
        reply(stat_free_memory=10**5000),
        RAM,
        "stat-free-memory is impossibly large: a 16610-bit integer",
        ("free_bytes",),
    ),
    (
        reply(stat_free_memory=1.5e8),
        RAM,
        "stat-free-memory is not an integer but 150000000.0",
        ("free_bytes",),
    ),
    (reply(stat_oom_kills=True), RAM, "stat-oom-kills is not an integer but True", ("oom_kills",)),
    (
        reply(stat_disk_caches="12345"),
        RAM,
        "stat-disk-caches is not an integer but '12345'",
        ("disk_caches_bytes",),
    ),
    (
        reply(stat_total_memory=None),
        RAM,
        "stat-total-memory is not an integer but None",
        ("total_bytes",),
    ),
    (
        reply(stat_swap_out=[1, 2]),
        RAM,
        "stat-swap-out is not an integer but an array",
        ("swap_out_bytes",),
    ),
    (reply(last_update=-5), RAM, "last-update -5 is out of range", ()),
    (
        reply(last_update=int(NOW + FUTURE_TOLERANCE_S + 60)),
        RAM,
        "last-update is 70 s in the future",
        (),
    ),
    (
        {"stats": QEMU_9_2["stats"], "last-update": 1.7e9},
        RAM,
        "last-update is not an integer but 1700000000.0",
        (),
    ),
    (
        {"stats": QEMU_9_2["stats"], "last-update": "1700000000"},
        RAM,
        "last-update is not an integer",
        (),
    ),
    ({"stats": QEMU_9_2["stats"]}, RAM, "last-update is missing", ()),
    ({"last-update": 1_759_999_998}, RAM, "stats are missing", ()),
    (
        {"stats": [1, 2], "last-update": 1_759_999_998},
        RAM,
        "stats is not an object but an array",
        (),
    ),
    (
        {"stats": QEMU_9_2["stats"], "last-update": 0},
        RAM,
        "stats have values but last-update is 0",
        (),
    ),
    ([QEMU_9_2], RAM, "reply is not an object but an array", ()),
    ("guest-stats", RAM, "reply is not an object but a string", ()),
    (None, RAM, "reply is not an object but null", ()),
    (42, RAM, "reply is not an object but an integer", ()),
]


@pytest.mark.parametrize(("raw", "ram", "problem", "withheld"), IMPOSSIBLE)
def test_impossible_values_are_flagged_and_not_served(
    raw: object, ram: int | None, problem: str, withheld: tuple[str, ...]
) -> None:
    stats = parse_guest_stats(raw, ram_bytes=ram, now=NOW)
    assert not stats.valid
    assert any(problem in p for p in stats.problems), stats.problems
    for name in withheld:
        assert getattr(stats, name) is None, name


def test_a_contradiction_leaves_unrelated_stats_served_but_flags_the_sample() -> None:
    stats = parse_guest_stats(
        reply(stat_free_memory=2 * GiB, stat_total_memory=1 * GiB), ram_bytes=4 * GiB, now=NOW
    )
    assert not stats.valid
    assert stats.problems == ("free 2.0 GiB > total 1.0 GiB",)
    assert stats.major_faults == 231
    assert stats.available_bytes == 438_910_976


def test_several_problems_are_all_reported() -> None:
    stats = parse_guest_stats(
        reply(stat_swap_in=-1, stat_free_memory=2 * GiB, stat_total_memory=1 * GiB), now=NOW
    )
    assert len(stats.problems) == 2


def test_boundaries_are_accepted() -> None:
    stats = parse_guest_stats(
        reply(
            last_update=int(NOW + FUTURE_TOLERANCE_S),
            stat_minor_faults=MAX_VALUE,
            stat_total_memory=RAM,
            stat_free_memory=RAM,
            stat_available_memory=RAM,
            stat_disk_caches=RAM,
        ),
        ram_bytes=RAM,
        now=NOW,
    )
    assert stats.valid, stats.problems
    assert stats.minor_faults == MAX_VALUE
    assert stats.total_bytes == stats.free_bytes == RAM
    assert stats.age(NOW) == 0.0  # slightly ahead of now: clamped, not negative


def test_without_ram_size_total_is_not_bounded() -> None:
    stats = parse_guest_stats(reply(stat_total_memory=64 * GiB), now=NOW)
    assert stats.valid
    assert stats.total_bytes == 64 * GiB


def test_unknown_stats_are_kept_apart_and_never_invalidate() -> None:
    raw = reply()
    raw["stats"].update({"stat-new-thing": 7, "stat-bad": "x", "stat-unset": UNSET, "other": 1})
    stats = parse_guest_stats(raw, ram_bytes=RAM, now=NOW)
    assert stats.valid, stats.problems
    assert stats.unknown == {"stat-new-thing": 7}


def test_unknown_stats_are_bounded() -> None:
    raw = reply()
    raw["stats"].update({f"stat-x{i}": i for i in range(MAX_UNKNOWN * 3)})
    stats = parse_guest_stats(raw, ram_bytes=RAM, now=NOW)
    assert len(stats.unknown) == MAX_UNKNOWN


# -- properties ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.sampled_from([0, UNSET, MAX_VALUE, MAX_VALUE + 1, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
stat_keys = st.sampled_from([*STAT_FIELDS, "stat-future", "last-update", "x"])
shaped_replies = st.fixed_dictionaries(
    {
        "stats": st.dictionaries(stat_keys, json_values, max_size=20) | json_values,
        "last-update": json_values,
    },
)


def check_served_values(stats: GuestStats, ram: int | None) -> None:
    """What parse promises about anything it serves, valid or not."""
    assert isinstance(stats, GuestStats)
    assert stats.valid == (not stats.problems)
    for name in STAT_FIELDS.values():
        value = getattr(stats, name)
        assert value is None or (type(value) is int and 0 <= value <= MAX_VALUE), (name, value)
    total = stats.total_bytes
    for part in (stats.free_bytes, stats.available_bytes, stats.disk_caches_bytes):
        if part is not None and total is not None:
            assert part <= total
        if part is not None and ram is not None:
            assert part <= ram
    if total is not None and ram is not None:
        assert total <= ram


@given(json_values, st.one_of(st.none(), st.integers(min_value=1, max_value=2**40)))
def test_parse_never_raises_on_arbitrary_json(raw: object, ram: int | None) -> None:
    check_served_values(parse_guest_stats(raw, ram_bytes=ram, now=NOW), ram)


@given(shaped_replies, st.one_of(st.none(), st.integers(min_value=1, max_value=2**40)))
def test_parse_never_raises_on_reply_shaped_input(raw: object, ram: int | None) -> None:
    check_served_values(parse_guest_stats(raw, ram_bytes=ram, now=NOW), ram)


counter_values = st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_VALUE))


@st.composite
def consistent_stats(draw: st.DrawFn) -> GuestStats:
    total = draw(st.integers(min_value=0, max_value=RAM))
    sizes: dict[str, Any] = {
        name: draw(st.one_of(st.none(), st.integers(min_value=0, max_value=total)))
        for name in ("free_bytes", "available_bytes", "disk_caches_bytes")
    }
    counters: dict[str, Any] = {name: draw(counter_values) for name in COUNTER_FIELDS}
    last_update = draw(st.integers(min_value=1, max_value=int(NOW)))
    return GuestStats(last_update=float(last_update), total_bytes=total, **sizes, **counters)


@given(consistent_stats())
def test_format_then_parse_round_trips(stats: GuestStats) -> None:
    formatted = format_guest_stats(stats)
    assert len(formatted["stats"]) == 16
    assert parse_guest_stats(formatted, ram_bytes=RAM, now=NOW) == stats
