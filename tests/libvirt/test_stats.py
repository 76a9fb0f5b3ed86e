"""memoryStats() -> GuestStats: libvirt's names and units, and the checks QMP's replies get."""

from __future__ import annotations

import pytest

from daemon.guest_stats import GuestStats, parse_guest_stats
from daemon.libvirt.stats import LIBVIRT_STATS, parse_memory_stats

KiB, MiB = 1 << 10, 1 << 20
NOW = 1_800_000_000.0

# What libvirt 9 returned for the test guest (virsh dommemstat shows the same numbers).
REPLY = {
    "actual": 262144,
    "swap_in": 1,
    "swap_out": 2,
    "major_fault": 3,
    "minor_fault": 1626,
    "unused": 190000,
    "available": 230000,
    "usable": 200000,
    "last_update": 1_799_999_998,
    "disk_caches": 2300,
    "hugetlb_pgalloc": 4,
    "hugetlb_pgfail": 5,
    "rss": 198468,
}


def test_the_naming_trap_and_the_units() -> None:
    parsed = parse_memory_stats(REPLY, ram_bytes=256 * MiB, now=NOW)
    guest = parsed.guest
    assert guest.valid, guest.problems
    assert guest.last_update == 1_799_999_998.0
    assert guest.free_bytes == 190000 * KiB  # "unused"
    assert guest.total_bytes == 230000 * KiB  # "available" is the TOTAL
    assert guest.available_bytes == 200000 * KiB  # "usable" is MemAvailable
    assert guest.disk_caches_bytes == 2300 * KiB
    assert (guest.swap_in_bytes, guest.swap_out_bytes) == (1 * KiB, 2 * KiB)
    assert (guest.major_faults, guest.minor_faults) == (3, 1626)
    assert (guest.hugetlb_allocations, guest.hugetlb_failures) == (4, 5)
    assert guest.oom_kills is None  # libvirt 9 does not pass QEMU 9.2's newer stats
    assert parsed.balloon_actual_bytes == 256 * MiB
    assert parsed.qemu_rss_bytes == 198468 * KiB
    assert parsed.problems == ()


def test_the_same_as_qemus_reply_through_the_qmp_parser() -> None:
    # libvirt is a renaming of QEMU's qom-get guest-stats: both parsers must agree.
    qmp = {
        "stats": {
            "stat-swap-in": 1 * KiB,
            "stat-swap-out": 2 * KiB,
            "stat-major-faults": 3,
            "stat-minor-faults": 1626,
            "stat-free-memory": 190000 * KiB,
            "stat-total-memory": 230000 * KiB,
            "stat-available-memory": 200000 * KiB,
            "stat-disk-caches": 2300 * KiB,
            "stat-htlb-pgalloc": 4,
            "stat-htlb-pgfail": 5,
        },
        "last-update": 1_799_999_998,
    }
    assert parse_memory_stats(REPLY, ram_bytes=256 * MiB, now=NOW).guest == parse_guest_stats(
        qmp, ram_bytes=256 * MiB, now=NOW
    )


def test_every_libvirt_stat_maps_to_a_different_guest_stat() -> None:
    assert len({stat for stat, _ in LIBVIRT_STATS.values()}) == len(LIBVIRT_STATS)


def test_before_the_first_update_and_without_a_period() -> None:
    # QEMU's last-update is 0 until the guest sends stats; libvirt leaves out unset stats.
    never = parse_memory_stats({"actual": 262144, "last_update": 0, "rss": 1}, now=NOW)
    assert never.guest == GuestStats()
    assert not never.guest.available and never.guest.valid
    # No stats period: libvirt returns only the balloon's actual size (and RSS).
    bare = parse_memory_stats({"actual": 262144, "rss": 1}, now=NOW)
    assert bare.guest == GuestStats() and bare.balloon_actual_bytes == 256 * MiB
    # No balloon at all.
    assert parse_memory_stats({}, now=NOW).balloon_actual_bytes is None


def test_stats_without_last_update_are_flagged() -> None:
    parsed = parse_memory_stats({"unused": 1000}, now=NOW)
    assert not parsed.guest.valid
    assert "last-update is missing" in parsed.guest.problems


def test_values_with_last_update_zero_are_flagged() -> None:
    parsed = parse_memory_stats({"unused": 1000, "last_update": 0}, now=NOW)
    assert not parsed.guest.valid


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ({"unused": 300 * 1024, "available": 200 * 1024}, "free"),  # free above total
        ({"available": 300 * 1024}, "total"),  # total above the VM's RAM
        ({"unused": "many"}, "stat-free-memory is not an integer"),
        ({"unused": True}, "stat-free-memory is not an integer"),
        ({"unused": 2**62}, "stat-free-memory is impossibly large"),
        ({"last_update": int(NOW) + 3600}, "in the future"),
    ],
)
def test_impossible_values_are_rejected_as_for_qmp(reply: dict[str, object], problem: str) -> None:
    parsed = parse_memory_stats(
        {"last_update": int(NOW) - 1, **reply}, ram_bytes=256 * MiB, now=NOW
    )
    assert not parsed.guest.valid
    assert any(problem in p for p in parsed.guest.problems), parsed.guest.problems


def test_host_side_values_are_checked_too() -> None:
    parsed = parse_memory_stats({"actual": -1, "rss": "x"}, now=NOW)
    assert parsed.balloon_actual_bytes is None and parsed.qemu_rss_bytes is None
    assert len(parsed.problems) == 2


@pytest.mark.parametrize("reply", [None, "text", [1, 2], 42])
def test_a_reply_that_is_not_a_mapping(reply: object) -> None:
    parsed = parse_memory_stats(reply)
    assert not parsed.guest.valid and parsed.balloon_actual_bytes is None


def test_unknown_keys_from_a_newer_libvirt_are_ignored() -> None:
    parsed = parse_memory_stats({**REPLY, "some_future_stat": 7}, ram_bytes=256 * MiB, now=NOW)
    assert parsed.guest.valid and parsed.guest.unknown == {}
