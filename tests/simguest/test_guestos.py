"""The model-backed guest kernel makes real host memory follow the model, page for page."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from daemon.guest_stats import STATS
from daemon.model.constants import PG_RESERVED
from daemon.model.host import BALLOONED, PRESENT, REPORTED
from daemon.simguest.balloon import STAT_NAMES
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.guestos import NO_REPORTING_ORDER, ModelGuestOS, block_pages
from daemon.simguest.ram import PAGE_SIZE, GuestRAM
from daemon.simguest.truth import components

MiB = 1 << 20
RAM = 128 * MiB


@pytest.fixture
def ram() -> Iterator[GuestRAM]:
    with GuestRAM(RAM) as r:
        yield r


def boot(ram: GuestRAM, workload: str, **kw: object) -> ModelGuestOS:
    spec = SimGuestSpec(name="g", ram_bytes=RAM, workload=workload, seed=3, **kw)  # type: ignore[arg-type]
    return ModelGuestOS(spec, ram)


def run(guest: ModelGuestOS, seconds: float, step: float = 0.25) -> None:
    for _ in range(int(seconds / step)):
        guest.advance(step)


def check_host_matches_model(guest: ModelGuestOS, ram: GuestRAM) -> None:
    """Used pages are backed; pages the model's host discarded are not; the kernel agrees."""
    states = guest.page_states()
    host = guest.sim.host.state_arr
    assert not np.any(states.used & ~ram.backed), "a page in use is not backed by the host"
    assert not np.any((host != PRESENT) & ram.backed), "a discarded page is still backed"
    assert np.array_equal(ram.resident_by_seek(), ram.backed)


def test_boot_writes_exactly_the_kernels_reservations(ram: GuestRAM) -> None:
    guest = boot(ram, "idle")
    reserved = np.zeros(ram.npages, dtype=bool)
    reserved[guest.sim.alloc.heads(PG_RESERVED)] = True
    assert reserved.sum() > 0
    assert np.array_equal(ram.backed, reserved)


@pytest.mark.parametrize("workload", ["memhog", "fragment", "pagecache", "idle"])
def test_host_memory_follows_the_model(ram: GuestRAM, workload: str) -> None:
    guest = boot(ram, workload)
    for _ in range(6):
        run(guest, 5.0)
        check_host_matches_model(guest, ram)


def test_reported_blocks_are_discarded_and_counted_as_reported(ram: GuestRAM) -> None:
    guest = boot(ram, "memhog")
    run(guest, 20.0)  # allocate half, hold, free: the freed memory gets reported
    host = guest.sim.host.state_arr
    assert np.count_nonzero(host == REPORTED) > 0
    states = guest.page_states()
    c = components(states, guest.reporting_order)
    # Reporting took back what the guest had written; the rest it reported was never backed.
    taken = (host == REPORTED) & states.free & ram.touched
    assert np.count_nonzero(taken) * PAGE_SIZE == c["reported"] > 0
    absent_free = np.count_nonzero(states.free & ~ram.backed) * PAGE_SIZE
    assert c["reported"] + c["untouched"] == absent_free


def test_balloon_takes_pages_from_the_guest_and_the_host(ram: GuestRAM) -> None:
    guest = boot(ram, "idle")
    run(guest, 1.0)
    before = guest.stats()
    assert guest.balloon_toward(4096, 1000) == 1000  # at most max_pages per call
    assert guest.balloon_toward(4096, 10_000) == 4096
    pages = np.array(guest.sim.balloon.pages)
    assert not ram.backed[pages].any()
    assert np.all(guest.sim.host.state_arr[pages] == BALLOONED)
    after = guest.stats()
    assert before.total_bytes is not None and after.total_bytes is not None
    assert before.total_bytes - after.total_bytes == 4096 * PAGE_SIZE
    c = components(guest.page_states(), guest.reporting_order)
    assert c["ballooned"] == 4096 * PAGE_SIZE
    assert guest.balloon_toward(0, 10_000) == 0
    # Deflated pages are free again but not backed until the guest writes them.
    states = guest.page_states()
    assert states.deflated[pages].all() and not ram.backed[pages].any()
    check_host_matches_model(guest, ram)


def test_deflate_on_oom_keeps_ballooned_pages_in_total_memory(ram: GuestRAM) -> None:
    guest = boot(ram, "idle", deflate_on_oom=True)
    total = guest.stats().total_bytes
    guest.balloon_toward(1024, 1024)
    assert guest.stats().total_bytes == total


def test_stats_are_the_ten_a_linux_61_guest_sends(ram: GuestRAM) -> None:
    guest = boot(ram, "pagecache")
    run(guest, 10.0)
    stats = guest.stats()
    sent = {s.qmp for s in STATS if getattr(stats, s.field) is not None}
    assert sent == set(STAT_NAMES)
    truth = components(guest.page_states(), guest.reporting_order)
    assert stats.disk_caches_bytes == truth["cache"] > 0
    assert stats.total_bytes is not None and stats.total_bytes < RAM
    assert stats.free_bytes is not None and stats.available_bytes is not None
    assert stats.free_bytes <= truth["free"]  # per-CPU lists are free but not counted
    assert stats.available_bytes > stats.free_bytes
    assert stats.major_faults is not None and stats.major_faults > 0


def test_without_free_page_reporting_nothing_is_discarded_or_reportable(ram: GuestRAM) -> None:
    guest = boot(ram, "memhog", free_page_reporting=False)
    run(guest, 20.0)  # memhog has allocated, held and freed half of RAM: now it idles
    assert guest.reporting_order == NO_REPORTING_ORDER
    assert not np.any(guest.sim.host.state_arr == REPORTED)
    c = components(guest.page_states(), guest.reporting_order)
    assert c["reported"] == c["reportable"] == 0
    assert c["stranded"] == c["free_resident"] > 0


def test_block_pages_expands_mixed_orders() -> None:
    pages = block_pages([(8, 0), (16, 2), (4, 1)])
    assert sorted(pages.tolist()) == [4, 5, 8, 16, 17, 18, 19]
    assert block_pages([]).size == 0
