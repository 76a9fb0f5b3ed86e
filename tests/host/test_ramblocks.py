from __future__ import annotations

import pytest

from daemon.host.ramblocks import RamBlock, parse_ramblocks, select_guest_ram
from daemon.host.unavailable import Reason, Unavailable
from tests.host import fixtures
from tests.host.qemu import Qemu

MiB = 1 << 20


def test_parse_default_ram_table() -> None:
    blocks = parse_ramblocks(fixtures.text(fixtures.DEFAULT, "ramblock"))
    assert blocks[0] == RamBlock("pc.ram", 4096, 0, 256 * MiB, 256 * MiB)
    acpi = next(b for b in blocks if b.name == "/rom@etc/acpi/tables")
    assert (acpi.offset, acpi.used, acpi.total) == (0x10080000, 0x20000, 0x200000)
    assert [b.name for b in blocks] == [
        "pc.ram",
        "/rom@etc/acpi/tables",
        "pc.bios",
        "pc.rom",
        "/rom@etc/table-loader",
        "/rom@etc/acpi/rsdp",
    ]


def test_parse_other_page_sizes() -> None:
    header = fixtures.text(fixtures.DEFAULT, "ramblock").splitlines()[0]
    rows = [
        "                mem0    2 MiB  0x0000000000000000 0x0000000040000000 0x0000000040000000",
        "                mem1    1 GiB  0x0000000040000000 0x0000000040000000 0x0000000040000000",
    ]
    text = "\n".join([header, *rows])
    assert [b.page_size for b in parse_ramblocks(text)] == [2 * MiB, 1024 * MiB]


@pytest.mark.parametrize("bad", ["", "pc.ram 4 KiB 0x0 0x0 0x0", "Block Name\nnot a row at all"])
def test_parse_rejects_unknown_format(bad: str) -> None:
    with pytest.raises(ValueError, match="x-query-ramblock"):
        parse_ramblocks(bad)


def test_select_by_memdev_id() -> None:
    for name, expected in (
        (fixtures.DEFAULT, ["pc.ram"]),
        (fixtures.MEMFD, ["ram0"]),
        (fixtures.DIMMS, ["mem1", "mem2", "pc.ram"]),  # ordered by ram_addr offset
    ):
        blocks = parse_ramblocks(fixtures.text(name, "ramblock"))
        chosen = select_guest_ram(blocks, fixtures.qmp(name)["query-memdev"])
        assert not isinstance(chosen, Unavailable)
        assert [g.name for g in chosen] == expected
        assert {g.rule for g in chosen} == {"memdev-id"}
    memfd = select_guest_ram(
        parse_ramblocks(fixtures.text(fixtures.MEMFD, "ramblock")),
        fixtures.qmp(fixtures.MEMFD)["query-memdev"],
    )
    assert not isinstance(memfd, Unavailable) and memfd[0].share is True


def test_select_by_size_without_memdevs() -> None:
    blocks = parse_ramblocks(fixtures.text(fixtures.DEFAULT, "ramblock"))
    chosen = select_guest_ram(blocks, None, 256 * MiB)
    assert not isinstance(chosen, Unavailable)
    assert [(g.name, g.rule) for g in chosen] == [("pc.ram", "ram-size")]


def test_select_says_why_not() -> None:
    blocks = parse_ramblocks(fixtures.text(fixtures.DEFAULT, "ramblock"))
    missing = select_guest_ram(blocks, [{"id": "nope", "size": 1}])
    assert isinstance(missing, Unavailable) and missing.reason is Reason.UNKNOWN_LAYOUT
    assert "nope" in missing.detail
    unknown = select_guest_ram(blocks, None, None)
    assert isinstance(unknown, Unavailable) and unknown.reason is Reason.UNKNOWN_LAYOUT
    twins = [RamBlock("a", 4096, 0, MiB, MiB), RamBlock("b", 4096, MiB, MiB, MiB)]
    ambiguous = select_guest_ram(twins, None, MiB)
    assert isinstance(ambiguous, Unavailable) and ambiguous.reason is Reason.AMBIGUOUS_LAYOUT


def test_live_qemu_tables_parse(qemu_default: Qemu, qemu_memfd: Qemu) -> None:
    for q, name in ((qemu_default, "pc.ram"), (qemu_memfd, "ram0")):
        blocks = parse_ramblocks(q.ramblock_text)
        chosen = select_guest_ram(blocks, q.memdevs, q.ram_size)
        assert not isinstance(chosen, Unavailable)
        assert [(g.name, g.block.total) for g in chosen] == [(name, 256 * MiB)]
    # The kept fixtures are what this QEMU prints.
    assert qemu_default.ramblock_text == fixtures.text(fixtures.DEFAULT, "ramblock")
    assert qemu_memfd.ramblock_text == fixtures.text(fixtures.MEMFD, "ramblock")
