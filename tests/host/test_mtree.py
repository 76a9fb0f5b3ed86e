from __future__ import annotations

import pytest

from daemon.host.mtree import GuestPhysMap, parse_flatview
from tests.host import fixtures
from tests.host.qemu import BLOB_GPA, Qemu

MiB = 1 << 20
GiB = 1 << 30


def test_flatview_of_system_memory() -> None:
    ranges = parse_flatview(fixtures.text(fixtures.DEFAULT, "mtree"))
    ram = [(r.start, r.size, r.region, r.offset) for r in ranges if r.kind == "ram"]
    assert ram == [(0, 0xC0000, "pc.ram", 0), (0x100000, 256 * MiB - 0x100000, "pc.ram", 0x100000)]
    kinds = {r.region: r.kind for r in ranges}
    assert kinds["pc.rom"] == "rom" and kinds["ioapic"] == "i/o"


def test_missing_address_space() -> None:
    with pytest.raises(ValueError, match="no FlatView"):
        parse_flatview('FlatView #0\n AS "I/O", root: io\n')


def test_gpa_below_and_above_4g() -> None:
    gpa = GuestPhysMap.from_mtree(fixtures.text(fixtures.DIMMS, "mtree"))
    assert gpa.regions() == {"pc.ram", "mem1", "mem2"}
    assert gpa.gpa("pc.ram", 16 * MiB, 4 * MiB) == 16 * MiB
    # pc.ram above 3 GiB is the ram-above-4g alias at 4 GiB.
    assert gpa.gpa("pc.ram", 3 * GiB, 2 * MiB) == 4 * GiB
    assert gpa.gpa("pc.ram", 4 * GiB - 2 * MiB, 2 * MiB) == 5 * GiB - 2 * MiB
    assert gpa.gpa("mem1", 0, 4 * MiB) == 0x140000000
    assert gpa.gpa("mem2", 2 * MiB, 2 * MiB) == 0x160000000 + 2 * MiB
    assert gpa.mapped_bytes("pc.ram") == 4 * GiB - 0x40000  # the 0xc0000-0xfffff ROM hole


def test_gpa_none_where_hidden_or_straddling() -> None:
    gpa = GuestPhysMap.from_mtree(fixtures.text(fixtures.DIMMS, "mtree"))
    assert gpa.gpa("pc.ram", 0xC0000) is None  # under pc.rom
    assert gpa.gpa("pc.ram", 3 * GiB - MiB, 2 * MiB) is None  # crosses the 3 GiB split
    assert gpa.gpa("pc.ram", 5 * GiB) is None
    assert gpa.gpa("nope", 0) is None


def test_live_mtree(qemu_default: Qemu, qemu_memfd: Qemu) -> None:
    for q, name in ((qemu_default, "pc.ram"), (qemu_memfd, "ram0")):
        gpa = GuestPhysMap.from_mtree(q.mtree_text)
        assert gpa.gpa(name, BLOB_GPA, 2 * MiB) == BLOB_GPA
        assert gpa.mapped_bytes(name) == 256 * MiB - 0x40000
