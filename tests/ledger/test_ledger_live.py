"""Host view and ledger together on real mappings: a child discards memory as QEMU would.

Free page reporting discards aligned 2 MiB/4 MiB blocks (MADV_DONTNEED; for fd-backed RAM also
a punched hole); a balloon discards scattered 4 KiB pages; a guest reusing memory refaults it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.host.ramblocks import GuestRamBlock, RamBlock
from daemon.host.residency import Method
from daemon.host.view import GuestRamScan, HostView
from daemon.ledger.ranges import Ledger
from tests.host.memchild import MemChild

MiB = 1 << 20
ANON_PAGES = (64 * MiB) // 4096
FILE_PAGES = (32 * MiB) // 4096


@pytest.fixture
def guest() -> Iterator[tuple[MemChild, HostView]]:
    blocks = [
        GuestRamBlock(RamBlock("pc.ram", 4096, 0, 64 * MiB, 64 * MiB), "memdev-id"),
        GuestRamBlock(RamBlock("mem1", 4096, 64 * MiB, 32 * MiB, 32 * MiB), "memdev-id"),
    ]
    with MemChild() as child:
        child.map("anon", "anon", 64 * MiB)
        child.map("file", "memfd", 32 * MiB)
        child.touch("anon", [(0, ANON_PAGES)])
        child.touch("file", [(0, FILE_PAGES)])
        view = HostView(child.pid, blocks)
        yield child, view
        view.close()


def _scan(view: HostView) -> GuestRamScan:
    result = view.scan()
    assert isinstance(result, GuestRamScan), result
    return result


def test_reports_balloon_and_refaults(guest: tuple[MemChild, HostView]) -> None:
    child, view = guest
    first = _scan(view)
    assert {b.mapping.name: b.snapshot.method for b in first.blocks} == {
        "pc.ram": Method.PAGEMAP_SCAN,
        "mem1": Method.SEEK_DATA,
    }
    ledger = Ledger()
    actual = 96 * MiB
    ledger.observe(first, balloon_actual=actual)
    assert ledger.summary().backed_bytes == 96 * MiB

    # Reporting: an order-10 and an order-9 block of anonymous RAM, an order-10 block of memfd.
    child.dontneed("anon", [(2048, 3072), (4608, 5120)])
    child.punch("file", [(1024, 2048)])
    obs = ledger.observe(_scan(view), balloon_actual=actual)
    got = [(r.block, r.offset, r.order, r.discarded) for r in obs.ranges]
    assert sorted(got) == sorted(
        [("pc.ram", 8 * MiB, 10, 4 * MiB), ("pc.ram", 18 * MiB, 9, 2 * MiB),
         ("mem1", 4 * MiB, 10, 4 * MiB)]
    )  # fmt: skip
    assert obs.reported == 10 * MiB and obs.ballooned == obs.unexplained == 0

    # The balloon inflates by 300 pages, scattered.
    balloon = [(p, p + 1) for p in range(6000, 8100, 7)]
    child.dontneed("anon", balloon)
    actual -= len(balloon) * 4096
    obs = ledger.observe(_scan(view), balloon_actual=actual)
    assert obs.ballooned == len(balloon) * 4096 and obs.reported == 0 and obs.ranges == ()

    # A host-side discard nobody explains.
    child.dontneed("anon", [(9000, 9010)])
    obs = ledger.observe(_scan(view), balloon_actual=actual)
    assert obs.unexplained == 10 * 4096 and obs.reported == 0

    # The guest reuses part of a reported block.
    child.touch("anon", [(2048, 2100)])
    obs = ledger.observe(_scan(view), balloon_actual=actual)
    assert obs.refaulted == 52 * 4096 and obs.first_touch == 0

    s = ledger.summary()
    assert s.reported_bytes == 10 * MiB - 52 * 4096
    assert s.reported_bytes_total == 10 * MiB
    assert s.refaulted_reported_bytes_total == 52 * 4096
    assert s.ballooned_bytes == len(balloon) * 4096
    assert s.unexplained_bytes == 10 * 4096
    assert s.backed_bytes == 96 * MiB - s.reported_bytes - s.ballooned_bytes - s.unexplained_bytes
    assert s.unattributed_bytes == 0
