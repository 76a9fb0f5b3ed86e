"""``build_free_lists``: the cross-checks against RAM and MemFree, and the value it returns."""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from daemon.agent.errors import GuestDataRejected
from daemon.agent.freelists import FREE_SLACK_MIN, build_free_lists, free_slack_bytes
from daemon.agent.procfs import REPORTING_INACTIVE, MigrateFree, PageTypeInfo, parse_pagetypeinfo
from daemon.model.constants import NR_PAGE_ORDERS, PAGE_SIZE
from tests.agent.fake_agent import GUEST_6_1, HOST_6_18, RAM_512M, buddyinfo_line, text

MIB = 1024 * 1024


def meminfo(total: int, free: int, available: int | None = None) -> str:
    lines = [f"MemTotal: {total // 1024} kB", f"MemFree: {free // 1024} kB"]
    if available is not None:
        lines.append(f"MemAvailable: {available // 1024} kB")
    return "\n".join(lines) + "\n"


def one_zone(pages_at_order: dict[int, int]) -> str:
    counts = [pages_at_order.get(order, 0) >> order for order in range(NR_PAGE_ORDERS)]
    return buddyinfo_line(0, "Normal", counts)


def test_the_test_guest_read() -> None:
    lists = build_free_lists(
        buddyinfo=text(GUEST_6_1, "buddyinfo"),
        meminfo=text(GUEST_6_1, "meminfo"),
        ram_bytes=RAM_512M,
        at=1000.0,
        span=0.05,
        reporting_order=9,
    )
    dma, dma32 = lists.zones
    for order in range(NR_PAGE_ORDERS):
        expected = (dma.free_blocks[order] + dma32.free_blocks[order]) << order
        assert lists.by_order_pages[order] == expected
    assert lists.free_bytes == (dma.free_pages + dma32.free_pages) * PAGE_SIZE
    assert lists.free_bytes_from(9) == sum(lists.by_order_pages[9:]) * PAGE_SIZE
    assert lists.free_bytes_from(REPORTING_INACTIVE) == 0
    assert abs(lists.free_bytes - lists.mem_free_bytes) <= free_slack_bytes(lists.mem_total_bytes)
    assert (lists.at, lists.span, lists.reporting_order, lists.problems) == (1000.0, 0.05, 9, ())
    assert lists.reporting_active is True


def test_reporting_state() -> None:
    build = {"buddyinfo": one_zone({}), "meminfo": meminfo(100 * MIB, 0), "at": 0.0}
    assert build_free_lists(**build, ram_bytes=RAM_512M).reporting_active is None  # type: ignore[arg-type]
    inactive = build_free_lists(
        **build,  # type: ignore[arg-type]
        ram_bytes=RAM_512M,
        reporting_order=REPORTING_INACTIVE,
    )
    assert inactive.reporting_active is False


def test_a_kernel_whose_memfree_is_not_its_buddy_lists_is_rejected() -> None:
    with pytest.raises(GuestDataRejected, match="MemFree"):
        build_free_lists(
            buddyinfo=text(HOST_6_18, "buddyinfo"),
            meminfo=text(HOST_6_18, "meminfo"),
            ram_bytes=32 * 1024 * MIB,
            at=0.0,
        )


@pytest.mark.parametrize(
    ("buddy", "mem", "why"),
    [
        # 600 MiB in order-10 blocks in a 512 MiB VM (one zone, then the total over two zones)
        (one_zone({10: 600 * 256}), meminfo(500 * MIB, 400 * MIB), "zone Normal claims"),
        (
            one_zone({10: 300 * 256}) + buddyinfo_line(0, "DMA32", [0] * 10 + [300 // 4]),
            meminfo(500 * MIB, 400 * MIB),
            "more than the VM's",
        ),
        (one_zone({10: 100 * 256}), meminfo(600 * MIB, 100 * MIB), "MemTotal"),
        (one_zone({10: 100 * 256}), meminfo(400 * MIB, 450 * MIB), "above MemTotal"),
        (one_zone({10: 100 * 256}), meminfo(400 * MIB, 100 * MIB, 401 * MIB), "above MemTotal"),
        (one_zone({10: 100 * 256}), meminfo(400 * MIB, 300 * MIB), "apart by more than"),
    ],
)
def test_counts_that_do_not_add_up_are_rejected(buddy: str, mem: str, why: str) -> None:
    with pytest.raises(GuestDataRejected, match=why):
        build_free_lists(buddyinfo=buddy, meminfo=mem, ram_bytes=RAM_512M, at=0.0)


def test_the_memfree_slack_is_what_it_says() -> None:
    free = 200 * MIB
    slack = free_slack_bytes(400 * MIB)
    assert slack == FREE_SLACK_MIN
    buddy = one_zone({0: free // PAGE_SIZE})
    for mem_free in (free - slack, free + slack):
        lists = build_free_lists(
            buddyinfo=buddy, meminfo=meminfo(400 * MIB, mem_free), ram_bytes=RAM_512M, at=0.0
        )
        assert lists.free_bytes == free
    for mem_free in (free - slack - 4096, free + slack + 4096):
        with pytest.raises(GuestDataRejected):
            build_free_lists(
                buddyinfo=buddy, meminfo=meminfo(400 * MIB, mem_free), ram_bytes=RAM_512M, at=0.0
            )
    assert free_slack_bytes(64 * 1024 * MIB) == 2048 * MIB  # 1/32 of a large guest


def test_migratetypes_above_ram_are_dropped_with_a_problem() -> None:
    honest = parse_pagetypeinfo(text(GUEST_6_1, "pagetypeinfo"))
    lying = PageTypeInfo(9, (MigrateFree("Movable", (0,) * 10 + (10**6,)),), capped=False)
    base = {
        "buddyinfo": text(GUEST_6_1, "buddyinfo"),
        "meminfo": text(GUEST_6_1, "meminfo"),
        "ram_bytes": RAM_512M,
        "at": 0.0,
    }
    assert build_free_lists(**base, migratetypes=honest).migratetypes == honest  # type: ignore[arg-type]
    dropped = build_free_lists(**base, migratetypes=lying, problems=("x",))  # type: ignore[arg-type]
    assert dropped.migratetypes is None
    assert dropped.problems[0] == "x" and "pagetypeinfo" in dropped.problems[1]


def test_ram_must_be_known() -> None:
    with pytest.raises(ValueError):
        build_free_lists(buddyinfo=one_zone({}), meminfo=meminfo(0, 0), ram_bytes=0, at=0.0)


@settings(max_examples=300, deadline=None)
@given(
    ram_mib=st.integers(64, 64 * 1024),
    zones=st.lists(
        st.lists(st.integers(0, 2**12), min_size=11, max_size=11), min_size=1, max_size=4
    ),
    total_share=st.floats(0.5, 1.2),
    free_delta=st.floats(-2.0, 2.0),
)
def test_whatever_is_accepted_is_consistent(
    ram_mib: int, zones: list[list[int]], total_share: float, free_delta: float
) -> None:
    # MemFree near the buddy total (within two slacks either way), MemTotal around RAM: both
    # sides of every check are reached.
    ram = ram_mib * MIB
    buddy = "".join(buddyinfo_line(n, "Normal", counts) for n, counts in enumerate(zones))
    buddy_bytes = sum(c << o for counts in zones for o, c in enumerate(counts)) * PAGE_SIZE
    total = int(ram * total_share) // 1024 * 1024
    mem_free = max(0, int(buddy_bytes + free_delta * free_slack_bytes(total))) // 1024 * 1024
    try:
        lists = build_free_lists(
            buddyinfo=buddy, meminfo=meminfo(total, mem_free), ram_bytes=ram, at=0.0
        )
    except GuestDataRejected:
        event("rejected")
        return
    event("accepted")
    assert lists.free_bytes == buddy_bytes
    assert len(lists.by_order_pages) == NR_PAGE_ORDERS and min(lists.by_order_pages) >= 0
    assert lists.free_bytes <= ram and lists.mem_total_bytes <= ram
    assert lists.mem_free_bytes <= lists.mem_total_bytes
    assert abs(lists.free_bytes - lists.mem_free_bytes) <= free_slack_bytes(lists.mem_total_bytes)
    assert all(z.free_pages * PAGE_SIZE <= ram for z in lists.zones)
    orders = range(NR_PAGE_ORDERS + 1)
    assert [lists.free_bytes_from(o) for o in orders] == sorted(
        (lists.free_bytes_from(o) for o in orders), reverse=True
    )
