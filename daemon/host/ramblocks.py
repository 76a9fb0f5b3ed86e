"""QEMU's RAM blocks, and which of them are guest RAM.

``parse_ramblocks(text)`` reads the human-readable table that ``x-query-ramblock`` returns
(inside ``{"human-readable-text": ...}``) and that HMP ``info ramblock`` prints, as on QEMU 7.2::

                  Block Name    PSize              Offset               Used              Total
                      pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000
                     pc.bios    4 KiB  0x0000000010000000 0x0000000000040000 0x0000000000040000

``Offset`` is the block's place in QEMU's ram_addr space, not a guest-physical address; ``Total``
is the size QEMU mapped (``max_length``), ``Used`` the part in use (they differ only for
resizeable blocks such as ACPI tables).

``select_guest_ram(blocks, memdevs, ram_size)`` picks the blocks that hold guest RAM and says by
which rule: ``memdev-id`` (a RAM block is named after its memory backend's id; QEMU 5.0+ gives
default RAM the backend id ``pc.ram``, ``mach-virt.ram``, ...) or, when ``query-memdev`` is not
known, ``ram-size`` (the one block as large as the memory-size summary's base memory).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from daemon.host.unavailable import Reason, Unavailable

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_ROW = re.compile(
    r"^\s*(?P<name>\S.*?)\s+(?P<psize>\d+(?:\.\d+)?)\s+(?P<unit>B|[KMGT]iB)"
    r"\s+0x(?P<offset>[0-9a-fA-F]+)\s+0x(?P<used>[0-9a-fA-F]+)\s+0x(?P<total>[0-9a-fA-F]+)\s*$"
)

SelectRule = Literal["memdev-id", "ram-size"]


@dataclass(frozen=True)
class RamBlock:
    """One row of ``x-query-ramblock``; sizes and offsets in bytes."""

    name: str
    page_size: int
    offset: int
    used: int
    total: int


@dataclass(frozen=True)
class GuestRamBlock:
    """A RAM block that holds guest RAM, with what ``query-memdev`` said about its backend."""

    block: RamBlock
    rule: SelectRule
    share: bool | None = None  # the backend's share=on|off (None when unknown)

    @property
    def name(self) -> str:
        return self.block.name


def parse_ramblocks(text: str) -> list[RamBlock]:
    """Parse the ``x-query-ramblock`` table; ValueError names the first line that does not fit."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or "Block Name" not in lines[0]:
        raise ValueError("x-query-ramblock: missing the 'Block Name ... Total' header")
    blocks = []
    for line in lines[1:]:
        m = _ROW.match(line)
        if m is None:
            raise ValueError(f"x-query-ramblock: cannot parse line {line.strip()!r}")
        blocks.append(
            RamBlock(
                name=m["name"],
                page_size=int(float(m["psize"]) * _UNITS[m["unit"]]),
                offset=int(m["offset"], 16),
                used=int(m["used"], 16),
                total=int(m["total"], 16),
            )
        )
    return blocks


def select_guest_ram(
    blocks: Sequence[RamBlock],
    memdevs: Sequence[Mapping[str, Any]] | None = None,
    ram_size: int | None = None,
) -> list[GuestRamBlock] | Unavailable:
    """The guest-RAM blocks among ``blocks``.

    ``memdevs`` is the ``query-memdev`` reply (each with ``id``, ``size``, ``share``); ``ram_size``
    the ``base-memory`` of ``query-memory-size-summary``. With memdevs, every backend whose id
    names a block of the backend's size is guest RAM (rule ``memdev-id``). Without them, the single
    block of exactly ``ram_size`` bytes is (rule ``ram-size``).
    """
    by_name = {b.name: b for b in blocks}
    if memdevs:
        chosen: list[GuestRamBlock] = []
        for dev in memdevs:
            block = by_name.get(str(dev.get("id")))
            if block is None or block.total != dev.get("size"):
                continue
            share = dev.get("share")
            chosen.append(
                GuestRamBlock(block, "memdev-id", share if isinstance(share, bool) else None)
            )
        if chosen:
            return sorted(chosen, key=lambda g: g.block.offset)
        ids = ", ".join(str(d.get("id")) for d in memdevs)
        return Unavailable(
            Reason.UNKNOWN_LAYOUT, f"no RAM block is named after a memory backend ({ids})"
        )
    if ram_size is None:
        return Unavailable(
            Reason.UNKNOWN_LAYOUT, "neither query-memdev nor the memory size is known"
        )
    sized = [b for b in blocks if b.total == ram_size]
    if len(sized) == 1:
        return [GuestRamBlock(sized[0], "ram-size")]
    if not sized:
        return Unavailable(Reason.UNKNOWN_LAYOUT, f"no RAM block of {ram_size} bytes")
    names = ", ".join(b.name for b in sized)
    return Unavailable(Reason.AMBIGUOUS_LAYOUT, f"several RAM blocks of {ram_size} bytes: {names}")
