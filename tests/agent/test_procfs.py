"""Parsers of the guest files: real kernels' output, each rejection rule, and hostile text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.agent.errors import GuestDataRejected
from daemon.agent.procfs import (
    BUDDYINFO,
    MAX_BYTES,
    MAX_ZONES,
    REPORTING_INACTIVE,
    ZoneFree,
    decode,
    parse_buddyinfo,
    parse_meminfo,
    parse_pagetypeinfo,
    parse_reporting_order,
)
from daemon.model.constants import MAX_PAGE_ORDER, NR_PAGE_ORDERS
from tests.agent.fake_agent import GUEST_6_1, HOST_6_18, buddyinfo_line, text


def test_the_test_guests_buddyinfo() -> None:
    zones = parse_buddyinfo(text(GUEST_6_1, "buddyinfo"))
    assert [(z.node, z.zone) for z in zones] == [(0, "DMA"), (0, "DMA32")]
    assert zones[1].free_blocks == (8, 2, 1, 1, 3, 5, 6, 8, 4, 1, 98)
    assert zones[1].free_pages == sum(c << o for o, c in enumerate(zones[1].free_blocks))


def test_a_host_kernels_buddyinfo_and_pagetypeinfo() -> None:
    zones = parse_buddyinfo(text(HOST_6_18, "buddyinfo"))
    assert [z.zone for z in zones] == ["DMA", "DMA32", "Normal"]
    assert all(len(z.free_blocks) == NR_PAGE_ORDERS for z in zones)
    info = parse_pagetypeinfo(text(HOST_6_18, "pagetypeinfo"))
    assert info.pageblock_order == 9 and not info.capped


def test_pagetypeinfo_per_migratetype_adds_up_to_buddyinfo() -> None:
    # The two files of the sample were read a moment apart from an idle guest: same lists.
    info = parse_pagetypeinfo(text(GUEST_6_1, "pagetypeinfo"))
    zones = parse_buddyinfo(text(GUEST_6_1, "buddyinfo"))
    assert info.pageblock_order == 9
    assert [m.migratetype for m in info.by_migratetype] == [
        "Unmovable",
        "Movable",
        "Reclaimable",
        "HighAtomic",
        "Isolate",
    ]
    for order in range(NR_PAGE_ORDERS):
        typed = sum(m.free_blocks[order] for m in info.by_migratetype)
        assert typed == sum(z.free_blocks[order] for z in zones)


def test_pagetypeinfo_keeps_a_capped_count_as_its_bound() -> None:
    capped = text(GUEST_6_1, "pagetypeinfo").replace("    97 \n", ">100000 \n", 1)
    info = parse_pagetypeinfo(capped)
    movable = next(m for m in info.by_migratetype if m.migratetype == "Movable")
    assert info.capped and movable.free_blocks[10] == 3 + 100000


def test_meminfo_in_bytes() -> None:
    fields = parse_meminfo(text(GUEST_6_1, "meminfo"))
    assert fields["MemTotal"] == 466396 * 1024
    assert fields["MemFree"] <= fields["MemTotal"]
    assert "HugePages_Total" not in fields  # a count, not kB
    assert fields["Active(anon)"] >= 0


@pytest.mark.parametrize(
    ("value", "order"),
    [("9\n", 9), ("0", 0), ("10", 10), ("11\n", REPORTING_INACTIVE), ("4294967295\n", 11)],
)
def test_reporting_order(value: str, order: int) -> None:
    assert parse_reporting_order(value) == order


@pytest.mark.parametrize("value", ["12", "-1", "", "9 9", "nine", "4294967294", "9" * 40])
def test_reporting_order_rejects(value: str) -> None:
    with pytest.raises(GuestDataRejected):
        parse_reporting_order(value)


GOOD = buddyinfo_line(0, "DMA32", [1] * NR_PAGE_ORDERS)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (buddyinfo_line(0, "DMA32", [1] * (NR_PAGE_ORDERS + 1)), "past MAX_PAGE_ORDER"),
        (GOOD.replace(" 1 ", " -1 ", 1), "not a non-negative integer"),
        (GOOD.replace(" 1 ", " 1e3 ", 1), "not a non-negative integer"),
        (GOOD.replace(" 1 ", " ٣ ", 1), "not a non-negative integer"),  # an Arabic-Indic 3
        (GOOD.replace(" 1 ", " " + "9" * 21 + " ", 1), "not a non-negative integer"),
        (GOOD + GOOD, "appears twice"),
        (GOOD.replace("zone", "zona"), "is not 'Node N, zone NAME"),
        (GOOD.replace("Node 0,", "Node 0"), "no ','"),
        (GOOD.replace("Node 0,", "Node 99999,"), "not plausible"),
        (GOOD.replace("DMA32", "DMA$32"), "not plausible"),
        ("Node 0, zone DMA32\n", "no free block counts"),
        ("\n\n", "no zones"),
        ("".join(buddyinfo_line(n, "Normal", [0]) for n in range(MAX_ZONES + 1)), "lines"),
    ],
)
def test_buddyinfo_rejects(text: str, why: str) -> None:
    with pytest.raises(GuestDataRejected, match=why):
        parse_buddyinfo(text)


def test_buddyinfo_with_fewer_orders_pads_with_zeros() -> None:
    (zone,) = parse_buddyinfo(buddyinfo_line(0, "Normal", [3, 2, 1]))
    assert zone.free_blocks == (3, 2, 1) + (0,) * (NR_PAGE_ORDERS - 3)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("MemTotal: 100 kB\n", "no MemFree"),
        ("MemTotal: 100 kB\nMemFree: 10 MB\n", "unit"),
        ("MemTotal: 100 kB\nMemTotal: 100 kB\nMemFree: 1 kB\n", "twice"),
        ("MemTotal 100 kB\nMemFree: 1 kB\n", "is not 'Key: value"),
        ("MemTotal: -100 kB\nMemFree: 1 kB\n", "not a non-negative integer"),
        ("MemTotal: 1 2 kB\nMemFree: 1 kB\n", "is not 'Key: value"),
    ],
)
def test_meminfo_rejects(text: str, why: str) -> None:
    with pytest.raises(GuestDataRejected, match=why):
        parse_meminfo(text)


def test_pagetypeinfo_rejects_bad_lines() -> None:
    good = text(GUEST_6_1, "pagetypeinfo")
    with pytest.raises(GuestDataRejected, match="Page block order"):
        parse_pagetypeinfo(good.replace("Page block order: 9", "Page block order: 12"))
    with pytest.raises(GuestDataRejected, match="repeated type"):
        parse_pagetypeinfo(good.replace("Movable", "Unmovable", 1))
    with pytest.raises(GuestDataRejected, match="past MAX_PAGE_ORDER"):
        parse_pagetypeinfo(good.replace("     97 \n", "     97      1 \n", 1))
    many = "".join(f"Node 0, zone DMA, type T{i} 0 0 0 0 0 0 0 0 0 0 0\n" for i in range(9))
    with pytest.raises(GuestDataRejected, match="migratetypes"):
        parse_pagetypeinfo("Page block order: 9\n" + many)


def test_decode_refuses_oversized_and_non_ascii() -> None:
    assert decode(BUDDYINFO, GOOD.encode()) == GOOD
    with pytest.raises(GuestDataRejected, match="more than"):
        decode(BUDDYINFO, b"x" * (MAX_BYTES[BUDDYINFO] + 1))
    with pytest.raises(GuestDataRejected, match="not ASCII"):
        decode(BUDDYINFO, GOOD.encode() + b"\xff")


# Hostile text: every parser either returns what its contract says or rejects; nothing else.


def mutated(base: str) -> st.SearchStrategy[str]:
    """``base`` with a few characters replaced, inserted or deleted."""
    alphabet = st.sampled_from([*"0123456789 ,-:\n\t>xzoneNodeDMAkB", "\x00", "٣"])

    def apply(edits: list[tuple[int, int, str]]) -> str:
        out = base
        for kind, pos, char in edits:
            pos %= max(len(out), 1)
            if kind == 0:
                out = out[:pos] + char + out[pos + 1 :]
            elif kind == 1:
                out = out[:pos] + char + out[pos:]
            else:
                out = out[:pos] + out[pos + 1 :]
        return out

    edit = st.tuples(st.integers(0, 2), st.integers(0, 10_000), alphabet)
    return st.lists(edit, min_size=1, max_size=6).map(apply)


def check_zones(zones: tuple[ZoneFree, ...]) -> None:
    assert 1 <= len(zones) <= MAX_ZONES
    assert len({(z.node, z.zone) for z in zones}) == len(zones)
    for zone in zones:
        assert len(zone.free_blocks) == NR_PAGE_ORDERS
        assert all(type(c) is int and 0 <= c < 10**20 for c in zone.free_blocks)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), mutated(text(GUEST_6_1, "buddyinfo"))))
def test_buddyinfo_on_hostile_text(hostile: str) -> None:
    try:
        zones = parse_buddyinfo(hostile)
    except GuestDataRejected as exc:
        assert exc.kind == "rejected" and "\n" not in exc.reason and len(exc.reason) <= 240
        return
    check_zones(zones)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=400), mutated(text(GUEST_6_1, "meminfo"))))
def test_meminfo_on_hostile_text(hostile: str) -> None:
    try:
        fields = parse_meminfo(hostile)
    except GuestDataRejected:
        return
    assert {"MemTotal", "MemFree"} <= set(fields)
    assert all(v >= 0 and v % 1024 == 0 for v in fields.values())


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=400), mutated(text(GUEST_6_1, "pagetypeinfo"))))
def test_pagetypeinfo_on_hostile_text(hostile: str) -> None:
    try:
        info = parse_pagetypeinfo(hostile)
    except GuestDataRejected:
        return
    assert 0 <= info.pageblock_order <= MAX_PAGE_ORDER
    assert all(len(m.free_blocks) == NR_PAGE_ORDERS for m in info.by_migratetype)
    assert all(c >= 0 for m in info.by_migratetype for c in m.free_blocks)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_reporting_order_on_hostile_text(hostile: str) -> None:
    try:
        order = parse_reporting_order(hostile)
    except GuestDataRejected:
        return
    assert 0 <= order <= REPORTING_INACTIVE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_on_hostile_bytes(hostile: bytes) -> None:
    try:
        decoded = decode(BUDDYINFO, hostile)
    except GuestDataRejected:
        assert not hostile.isascii()
        return
    assert decoded.encode() == hostile


zone_names = st.sampled_from(["DMA", "DMA32", "Normal", "Movable", "Device", "HighMem"])
zone_rows = st.lists(
    st.tuples(
        st.integers(0, 63), zone_names, st.lists(st.integers(0, 2**40), min_size=11, max_size=11)
    ),
    min_size=1,
    max_size=20,
    unique_by=lambda row: (row[0], row[1]),
)


@settings(max_examples=200, deadline=None)
@given(zone_rows)
def test_buddyinfo_as_the_kernel_prints_it_round_trips(
    rows: list[tuple[int, str, list[int]]],
) -> None:
    printed = "".join(buddyinfo_line(node, zone, counts) for node, zone, counts in rows)
    zones = parse_buddyinfo(printed)
    assert [(z.node, z.zone, list(z.free_blocks)) for z in zones] == rows
