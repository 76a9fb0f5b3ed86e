from __future__ import annotations

import subprocess
import sys

from daemon.host.maps import (
    MEMFD_NAME,
    GuestRamLayout,
    Vma,
    find_backing_fd,
    join_file_vmas,
    locate_guest_ram,
    match_guest_ram,
    parse_maps,
    read_maps,
)
from daemon.host.ramblocks import GuestRamBlock, RamBlock, parse_ramblocks, select_guest_ram
from daemon.host.unavailable import Reason, Unavailable
from tests.host import fixtures
from tests.host.qemu import Qemu

MiB = 1 << 20


def _blocks(name: str) -> list[GuestRamBlock]:
    chosen = select_guest_ram(
        parse_ramblocks(fixtures.text(name, "ramblock")), fixtures.qmp(name)["query-memdev"]
    )
    assert not isinstance(chosen, Unavailable)
    return chosen


def _block(name: str, size: int) -> GuestRamBlock:
    return GuestRamBlock(RamBlock(name, 4096, 0, size, size), "memdev-id")


def test_parse_maps_lines() -> None:
    vmas = parse_maps(
        "7f9013e00000-7f9023e00000 rw-p 00000000 00:00 0 \n"
        "7f9007fff000-7f9017fff000 rw-s 00000000 00:01 1029"
        "                       /memfd:memory-backend-memfd (deleted)\n"
        "garbage\n"
    )
    assert vmas == [
        Vma(0x7F9013E00000, 0x7F9023E00000, "rw-p", 0, (0, 0), 0, ""),
        Vma(0x7F9007FFF000, 0x7F9017FFF000, "rw-s", 0, (0, 1), 1029, MEMFD_NAME),
    ]
    assert vmas[0].size == 256 * MiB and vmas[0].writable


def test_match_rules_on_captured_layouts() -> None:
    cases: dict[str, dict[str, tuple[str, int | None]]] = {
        fixtures.DEFAULT: {"pc.ram": ("anon-size", 0x7F8A43E00000)},
        fixtures.MEMFD: {"ram0": ("memfd-name", None)},
        fixtures.DIMMS: {"pc.ram": ("anon-size", None), "mem1": ("anon-size", None),
                         "mem2": ("memfd-name", None)},
    }  # fmt: skip
    for name, expected in cases.items():
        vmas = parse_maps(fixtures.text(name, "maps"))
        found, missing = match_guest_ram(vmas, _blocks(name))
        assert missing == []
        assert {m.name: m.rule for m in found} == {k: v[0] for k, v in expected.items()}
        for m in found:
            assert m.size == m.block.block.total
            if expected[m.name][1] is not None:
                assert m.start == expected[m.name][1]
            vma = next(v for v in vmas if v.start == m.start)
            assert vma.size == m.size
    default = match_guest_ram(
        parse_maps(fixtures.text(fixtures.DEFAULT, "maps")), _blocks(fixtures.DEFAULT)
    )
    assert default[0][0].path == "" and not default[0][0].fd_backed


def test_file_path_rule_and_split_file_mappings() -> None:
    vmas = [
        Vma(0x1000_0000, 0x1100_0000, "rw-s", 0, (0, 27), 5, "/dev/hugepages/vm1"),
        Vma(0x1100_0000, 0x1200_0000, "rw-s", 16 * MiB, (0, 27), 5, "/dev/hugepages/vm1"),
        Vma(0x2000_0000, 0x2200_0000, "rw-s", 0, (0, 27), 6, "/dev/hugepages/other"),
    ]
    assert len(join_file_vmas(vmas)) == 2
    found, missing = match_guest_ram(
        vmas, [_block("ram0", 32 * MiB)], {"ram0": "/dev/hugepages/vm1"}
    )
    assert missing == [] and [(m.rule, m.start, m.size, m.fd_backed) for m in found] == [
        ("file-path", 0x1000_0000, 32 * MiB, True)
    ]
    # Without the path, two file mappings of the size leave the block ambiguous.
    found, missing = match_guest_ram(vmas, [_block("ram0", 32 * MiB)])
    assert found == [] and missing[0][1].reason is Reason.AMBIGUOUS_LAYOUT
    assert "2 mappings" in missing[0][1].detail


def test_equal_blocks_are_ambiguous_not_guessed() -> None:
    vmas = [
        Vma(0x1000_0000, 0x1800_0000, "rw-p", 0, (0, 0), 0, ""),
        Vma(0x2000_0000, 0x2800_0000, "rw-p", 0, (0, 0), 0, ""),
    ]
    found, missing = match_guest_ram(vmas, [_block("m0", 128 * MiB), _block("m1", 128 * MiB)])
    assert found == []
    assert [(n, u.reason) for n, u in missing] == [
        ("m0", Reason.AMBIGUOUS_LAYOUT),
        ("m1", Reason.AMBIGUOUS_LAYOUT),
    ]


def test_unknown_layout_names_the_block() -> None:
    vmas = parse_maps(fixtures.text(fixtures.DEFAULT, "maps"))
    found, missing = match_guest_ram(vmas, [_block("pc.ram", 300 * MiB)])
    assert found == []
    [(name, why)] = missing
    assert name == "pc.ram" and why.reason is Reason.UNKNOWN_LAYOUT
    assert str(300 * MiB) in why.detail


def test_private_file_mapping_is_not_scanned_through_the_file() -> None:
    """share=off maps the file privately: written pages are anonymous copies, not file data."""
    vmas = [Vma(0x1000_0000, 0x1200_0000, "rw-p", 0, (0, 1), 9, MEMFD_NAME)]
    [m], _ = match_guest_ram(vmas, [_block("ram0", 32 * MiB)])
    assert m.rule == "memfd-name" and not m.shared and not m.fd_backed


def test_share_must_agree_with_the_mapping() -> None:
    vmas = [
        Vma(0x1000_0000, 0x1200_0000, "rw-s", 0, (0, 0), 7, "/dev/zero (deleted)"),
        Vma(0x2000_0000, 0x2200_0000, "rw-p", 0, (0, 0), 0, ""),
    ]
    for share, start in ((True, 0x1000_0000), (False, 0x2000_0000)):
        block = GuestRamBlock(RamBlock("ram0", 4096, 0, 32 * MiB, 32 * MiB), "memdev-id", share)
        [m], missing = match_guest_ram(vmas, [block])
        assert missing == [] and (m.rule, m.start, m.shared) == ("anon-size", start, share)
    # Unknown share: both fit, and the block is ambiguous rather than guessed.
    _, [(_, why)] = match_guest_ram(vmas, [_block("ram0", 32 * MiB)])
    assert why.reason is Reason.AMBIGUOUS_LAYOUT


def test_read_only_and_special_mappings_never_match() -> None:
    vmas = [
        Vma(0x1000_0000, 0x1100_0000, "r--p", 0, (0, 0), 0, ""),
        Vma(0x2000_0000, 0x2100_0000, "rw-p", 0, (0, 0), 0, "[heap]"),
    ]
    found, _ = match_guest_ram(vmas, [_block("ram", 16 * MiB)])
    assert found == []


def test_locate_live_qemu(qemu_default: Qemu, qemu_memfd: Qemu) -> None:
    for q, rule in ((qemu_default, "anon-size"), (qemu_memfd, "memfd-name")):
        blocks = select_guest_ram(parse_ramblocks(q.ramblock_text), q.memdevs, q.ram_size)
        assert not isinstance(blocks, Unavailable)
        layout = locate_guest_ram(q.pid, blocks)
        assert isinstance(layout, GuestRamLayout), layout
        [m] = layout.mappings
        assert (m.rule, m.size) == (rule, 256 * MiB)
        fd = find_backing_fd(q.pid, m)
        if rule == "memfd-name":
            assert fd is not None
        else:
            assert fd is None


def test_gone_process_is_reported() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    result = read_maps(dead.pid)
    assert isinstance(result, Unavailable) and result.reason is Reason.NO_PROCESS
    located = locate_guest_ram(dead.pid, [_block("pc.ram", 256 * MiB)])
    assert isinstance(located, Unavailable) and located.reason is Reason.NO_PROCESS
