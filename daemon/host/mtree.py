"""Guest-physical addresses of RAM-block offsets, from HMP ``info mtree -f``.

``parse_flatview(text)`` reads the flattened view of the system address space (the FlatView that
serves ``AS "memory"``), as printed by QEMU 7.2::

    FlatView #2
     AS "memory", root: system
     AS "cpu-memory-0", root: system
     Root memory region: system
      0000000000000000-00000000000bffff (prio 0, ram): pc.ram
      00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
      0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000
      0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000

Each line is a guest-physical range, its type, the memory region that backs it and the offset into
that region (``@...``, 0 when absent). For guest RAM the region is named like its RAM block, so
``GuestPhysMap.gpa(block, offset)`` turns a RAM-block offset into a guest-physical address. Parts
of a block hidden by ROM or MMIO (the 0xc0000-0xfffff hole of ``pc.ram``) have no address.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass

_LINE = re.compile(
    r"^\s+(?P<start>[0-9a-f]+)-(?P<last>[0-9a-f]+) \(prio -?\d+, (?P<kind>[^)]*)\): "
    r"(?P<rest>.*)$"
)
_OFFSET = re.compile(r"^(?P<name>.*?) @(?P<offset>[0-9a-f]+)(?:\s.*)?$")
SYSTEM_AS = "memory"


@dataclass(frozen=True)
class FlatRange:
    """One guest-physical range of the flat view."""

    start: int
    size: int
    kind: str  # "ram", "rom", "i/o", "romd", "nv-ram", ...
    region: str
    offset: int  # offset of ``start`` within ``region``


def parse_flatview(text: str, address_space: str = SYSTEM_AS) -> list[FlatRange]:
    """The ranges of the FlatView that serves ``address_space``; ValueError if there is none."""
    ranges: list[FlatRange] = []
    in_view = found = False
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            if found:
                break
            in_view = False
        elif line.startswith(f' AS "{address_space}",'):
            in_view = found = True
        elif in_view and (m := _LINE.match(line)):
            start, last = int(m["start"], 16), int(m["last"], 16)
            rest = m["rest"].strip()
            off = _OFFSET.match(rest)
            region, offset = (off["name"], int(off["offset"], 16)) if off else (rest, 0)
            ranges.append(FlatRange(start, last - start + 1, m["kind"], region, offset))
    if not found:
        raise ValueError(f'info mtree -f: no FlatView for AS "{address_space}"')
    return ranges


class GuestPhysMap:
    """RAM-block offset -> guest-physical address, for the RAM ranges of a flat view."""

    def __init__(self, ranges: Iterable[FlatRange]) -> None:
        per_region: dict[str, list[FlatRange]] = {}
        for r in ranges:
            if r.kind.endswith("ram"):
                per_region.setdefault(r.region, []).append(r)
        self._ranges = {name: sorted(rs, key=lambda r: r.offset) for name, rs in per_region.items()}
        self._offsets = {name: [r.offset for r in rs] for name, rs in self._ranges.items()}

    @classmethod
    def from_mtree(cls, text: str) -> GuestPhysMap:
        return cls(parse_flatview(text))

    def regions(self) -> set[str]:
        """Names of the regions with guest-visible RAM."""
        return set(self._ranges)

    def mapped_bytes(self, region: str) -> int:
        """How much of ``region`` the guest sees as RAM."""
        return sum(r.size for r in self._ranges.get(region, ()))

    def gpa(self, region: str, offset: int, length: int = 1) -> int | None:
        """Guest-physical address of ``[offset, offset + length)`` of ``region``.

        None when the span is not wholly inside one guest-visible RAM range of the region.
        """
        offsets = self._offsets.get(region)
        if not offsets:
            return None
        i = bisect.bisect_right(offsets, offset) - 1
        if i < 0:
            return None
        r = self._ranges[region][i]
        if offset + length > r.offset + r.size:
            return None
        return r.start + (offset - r.offset)
