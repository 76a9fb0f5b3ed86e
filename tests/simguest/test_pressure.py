"""A balloon squeezed below the working set makes the simulated guest swap, stall and OOM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.guest_stats import GuestStats
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.guestos import ModelGuestOS
from daemon.simguest.ram import PAGE_SIZE, GuestRAM

MiB = 1 << 20
RAM = 128 * MiB
PAGES = RAM // PAGE_SIZE


@pytest.fixture
def ram() -> Iterator[GuestRAM]:
    with GuestRAM(RAM) as r:
        yield r


def boot(ram: GuestRAM, workload: str, **kw: object) -> ModelGuestOS:
    spec = SimGuestSpec(
        name="g", ram_bytes=RAM, workload=workload, seed=5, linux_6_12_stats=True, **kw
    )  # type: ignore[arg-type]
    return ModelGuestOS(spec, ram)


def run(guest: ModelGuestOS, seconds: float, target_pages: int = 0, step: float = 0.25) -> None:
    """Run with the balloon driven toward ``target_pages`` (its size in pages) all along."""
    for _ in range(int(seconds / step)):
        guest.advance(step)
        guest.balloon_toward(target_pages, 1 << 30)


def pressure(stats: GuestStats) -> tuple[int, int, int, int]:
    assert stats.swap_in_bytes is not None and stats.major_faults is not None
    assert stats.alloc_stalls is not None and stats.oom_kills is not None
    return stats.swap_in_bytes, stats.major_faults, stats.alloc_stalls, stats.oom_kills


def test_a_linux_61_guest_sends_no_stall_or_kill_counters(ram: GuestRAM) -> None:
    spec = SimGuestSpec(name="g", ram_bytes=RAM, workload="idle")
    stats = ModelGuestOS(spec, ram).stats()
    assert stats.oom_kills is None and stats.alloc_stalls is None
    assert stats.swap_in_bytes == 0


def test_a_guest_with_room_feels_nothing(ram: GuestRAM) -> None:
    guest = boot(ram, "churn")
    run(guest, 30.0)
    swap_in, _, stalls, kills = pressure(guest.stats())
    assert (swap_in, stalls, kills) == (0, 0, 0)


def test_a_balloon_below_the_working_set_causes_stalls_swap_ins_and_major_faults(
    ram: GuestRAM,
) -> None:
    guest = boot(ram, "churn")  # occupancy wanders 30-70 % of RAM
    run(guest, 10.0)
    before = pressure(guest.stats())
    run(guest, 30.0, target_pages=int(PAGES * 0.55))  # leaves 45 %: below the working set
    swap_in, major, stalls, _ = pressure(guest.stats())
    assert stalls > before[2]
    assert swap_in > before[0]
    assert major - before[1] >= (swap_in - before[0]) // PAGE_SIZE
    counters = guest.pressure.counters()
    assert 0 < counters.swapped_pages <= counters.swap_pages


def test_without_swap_the_squeezed_guest_oom_kills(ram: GuestRAM) -> None:
    guest = boot(ram, "churn", swap_bytes=0)
    run(guest, 30.0, target_pages=int(PAGES * 0.6))
    *_, kills = pressure(guest.stats())
    assert kills > 0


def test_with_swap_full_the_guest_oom_kills_and_the_kill_empties_swap(ram: GuestRAM) -> None:
    guest = boot(ram, "churn", swap_bytes=4 * MiB)
    run(guest, 40.0, target_pages=int(PAGES * 0.6))
    counters = guest.pressure.counters()
    assert counters.oom_kill > 0
    assert counters.swapped_pages <= counters.swap_pages


def test_deflate_on_oom_gives_balloon_pages_back_instead_of_killing(ram: GuestRAM) -> None:
    guest = boot(ram, "churn", swap_bytes=0, deflate_on_oom=True)
    target = int(PAGES * 0.6)
    run(guest, 30.0, target_pages=target)
    counters = guest.pressure.counters()
    assert counters.oom_deflated_pages > 0
    assert counters.oom_kill == 0
    # The driver does not inflate again over what the notifier gave back for the same target.
    assert len(guest.sim.balloon) < target


def test_memory_freed_again_brings_swapped_pages_back(ram: GuestRAM) -> None:
    guest = boot(ram, "churn")
    run(guest, 30.0, target_pages=int(PAGES * 0.55))
    swapped = guest.pressure.counters().swapped_pages
    assert swapped > 0
    run(guest, 30.0, target_pages=0)  # the balloon lets go
    assert guest.pressure.counters().swapped_pages < swapped
