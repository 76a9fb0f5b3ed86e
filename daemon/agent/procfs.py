"""Parsers for the guest files reclaimd reads through the agent, strict about shape.

The text comes from the guest, so it is untrusted: a parser accepts exactly what the kernel
prints (Linux 5.x-6.x, x86-64), with bounded sizes, line counts and numbers, and raises
``GuestDataRejected`` saying which line is wrong and how. Checks across files and against the
VM's RAM are in ``daemon.agent.freelists``.

- ``/proc/buddyinfo``: ``Node 0, zone   DMA32   8 10 4 ...``, free block counts per order.
- ``/proc/pagetypeinfo``: the same per migratetype, plus ``Page block order``.
- ``/proc/meminfo``: ``MemFree:  123456 kB`` and friends.
- ``/sys/module/page_reporting/parameters/page_reporting_order``: one number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.agent.errors import GuestDataRejected, one_line
from daemon.model.constants import MAX_PAGE_ORDER, NR_PAGE_ORDERS

BUDDYINFO = "/proc/buddyinfo"
PAGETYPEINFO = "/proc/pagetypeinfo"
MEMINFO = "/proc/meminfo"
REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"

# Size limits per file, far above what any VM prints: buddyinfo is about 100 bytes per zone
# (a 64-node guest with 4 zones: 26 KiB), meminfo about 1.5 KiB, pagetypeinfo about 7 lines
# per zone.
MAX_BYTES = {
    BUDDYINFO: 128 * 1024,
    PAGETYPEINFO: 512 * 1024,
    MEMINFO: 16 * 1024,
    REPORTING_ORDER: 32,
}
# One buddyinfo line per (node, zone): 128 nodes of 4 populated zones.
MAX_ZONES = 512
MAX_NODE = 1023  # MAX_NUMNODES is 1 << CONFIG_NODES_SHIFT (10 on Debian's x86-64 kernels)
MAX_MEMINFO_LINES = 256
MAX_PAGETYPE_LINES = 8 * MAX_ZONES
# Linux has six: Unmovable, Movable, Reclaimable, HighAtomic, CMA, Isolate.
MAX_MIGRATETYPES = 8
# Any real count or size fits in 64 bits (20 decimal digits); longer numbers are refused
# before Python spends time converting them.
MAX_DIGITS = 20
# page_reporting_order when no reporting device registered: MAX_ORDER (11) on Linux 6.1, and
# -1 printed as an unsigned int on kernels since 6.5. reclaimd keeps it as one value, one past
# the last order, so "reportable = free blocks of order >= reporting_order" is 0 for it.
REPORTING_INACTIVE = NR_PAGE_ORDERS
_INACTIVE_VALUES = frozenset({NR_PAGE_ORDERS, 2**32 - 1})
# /proc/pagetypeinfo prints ">100000" for a list it stopped counting (Linux 5.4+, to bound how
# long it holds the zone lock); the parser keeps the bound and says the figure is capped.
PAGETYPE_COUNT_CAP = 100000

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,15}")
_MEMINFO_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_()]{0,31}")


@dataclass(frozen=True, slots=True)
class ZoneFree:
    """The free lists of one zone: ``free_blocks[order]`` blocks of ``2**order`` pages."""

    node: int
    zone: str
    free_blocks: tuple[int, ...]

    @property
    def free_pages(self) -> int:
        return sum(count << order for order, count in enumerate(self.free_blocks))


@dataclass(frozen=True, slots=True)
class MigrateFree:
    """Free blocks per order of one migratetype, summed over all zones."""

    migratetype: str
    free_blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PageTypeInfo:
    """What ``/proc/pagetypeinfo`` says. ``capped``: some count was printed as ">100000" and
    is kept as 100000, a lower bound."""

    pageblock_order: int
    by_migratetype: tuple[MigrateFree, ...]
    capped: bool


def decode(path: str, data: bytes) -> str:
    """The file's text; procfs and sysfs print ASCII only."""
    limit = MAX_BYTES.get(path)
    if limit is not None and len(data) > limit:
        raise GuestDataRejected(f"{path}: {len(data)} bytes, more than {limit}")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise GuestDataRejected(f"{path}: not ASCII (byte {exc.start})") from None


def _lines(path: str, text: str, limit: int) -> list[tuple[int, str]]:
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(numbered) > limit:
        raise GuestDataRejected(f"{path}: {len(numbered)} lines, more than {limit}")
    return numbered


def _number(path: str, where: str, word: str) -> int:
    if not (word.isascii() and word.isdigit()) or len(word) > MAX_DIGITS:
        raise GuestDataRejected(
            f"{path}: {where}: {one_line(word, 24)!r} is not a non-negative integer"
        )
    return int(word)


def _counts(path: str, where: str, words: list[str], *, capped_ok: bool) -> tuple[bool, list[int]]:
    if not words:
        raise GuestDataRejected(f"{path}: {where}: no free block counts")
    if len(words) > NR_PAGE_ORDERS:
        raise GuestDataRejected(
            f"{path}: {where}: {len(words)} orders, past MAX_PAGE_ORDER {MAX_PAGE_ORDER}"
        )
    capped = False
    counts = []
    for order, word in enumerate(words):
        if capped_ok and word == f">{PAGETYPE_COUNT_CAP}":
            capped = True
            counts.append(PAGETYPE_COUNT_CAP)
        else:
            counts.append(_number(path, f"{where} order {order}", word))
    # A kernel built with fewer orders prints fewer columns: those orders hold nothing.
    return capped, counts + [0] * (NR_PAGE_ORDERS - len(counts))


def _node_zone(path: str, lineno: int, node_word: str, zone_word: str) -> tuple[int, str]:
    if not node_word.endswith(","):
        raise GuestDataRejected(f"{path}: line {lineno}: no ',' after the node number")
    node = _number(path, f"line {lineno} node", node_word[:-1])
    zone = zone_word.removesuffix(",")
    if node > MAX_NODE or not _NAME.fullmatch(zone):
        raise GuestDataRejected(
            f"{path}: line {lineno}: node {node} or zone {one_line(zone, 24)!r} is not plausible"
        )
    return node, zone


def parse_buddyinfo(text: str) -> tuple[ZoneFree, ...]:
    """The zones of ``/proc/buddyinfo``, in file order, each with ``NR_PAGE_ORDERS`` counts."""
    zones: list[ZoneFree] = []
    seen: set[tuple[int, str]] = set()
    for lineno, line in _lines(BUDDYINFO, text, MAX_ZONES):
        words = line.split()
        if len(words) < 4 or words[0] != "Node" or words[2] != "zone":
            raise GuestDataRejected(
                f"{BUDDYINFO}: line {lineno} is not 'Node N, zone NAME counts...'"
            )
        node, zone = _node_zone(BUDDYINFO, lineno, words[1], words[3])
        if (node, zone) in seen:
            raise GuestDataRejected(f"{BUDDYINFO}: node {node} zone {zone} appears twice")
        seen.add((node, zone))
        _, counts = _counts(BUDDYINFO, f"node {node} zone {zone}", words[4:], capped_ok=False)
        zones.append(ZoneFree(node, zone, tuple(counts)))
    if not zones:
        raise GuestDataRejected(f"{BUDDYINFO}: no zones")
    return tuple(zones)


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo``'s ``kB`` fields, in bytes (the unitless HugePages counts are left
    out). ``MemTotal`` and ``MemFree`` must be present."""
    fields: dict[str, int] = {}
    for lineno, line in _lines(MEMINFO, text, MAX_MEMINFO_LINES):
        key, sep, rest = line.partition(":")
        words = rest.split()
        if not sep or not _MEMINFO_KEY.fullmatch(key) or len(words) not in (1, 2):
            raise GuestDataRejected(f"{MEMINFO}: line {lineno} is not 'Key: value [kB]'")
        value = _number(MEMINFO, key, words[0])
        if len(words) == 2:
            if words[1] != "kB":
                raise GuestDataRejected(f"{MEMINFO}: {key}: unit {one_line(words[1], 8)!r}")
            if key in fields:
                raise GuestDataRejected(f"{MEMINFO}: {key} appears twice")
            fields[key] = value * 1024
    for required in ("MemTotal", "MemFree"):
        if required not in fields:
            raise GuestDataRejected(f"{MEMINFO}: no {required}")
    return fields


def parse_reporting_order(text: str) -> int:
    """The guest's ``page_reporting_order``: 0..MAX_PAGE_ORDER, or ``REPORTING_INACTIVE``
    when no reporting device has registered."""
    order = _number(REPORTING_ORDER, "value", text.strip())
    if order in _INACTIVE_VALUES:
        return REPORTING_INACTIVE
    if order > MAX_PAGE_ORDER:
        raise GuestDataRejected(
            f"{REPORTING_ORDER}: {order} is past MAX_PAGE_ORDER {MAX_PAGE_ORDER}"
        )
    return order


def parse_pagetypeinfo(text: str) -> PageTypeInfo:
    """The ``Page block order`` and the free-count section of ``/proc/pagetypeinfo``, summed
    over zones per migratetype. The block-count sections after it are not used."""
    pageblock_order: int | None = None
    totals: dict[str, list[int]] = {}
    seen: set[tuple[int, str, str]] = set()
    capped = False
    for lineno, line in _lines(PAGETYPEINFO, text, MAX_PAGETYPE_LINES):
        if line.startswith("Page block order:"):
            pageblock_order = _number(PAGETYPEINFO, "Page block order", line.split(":")[1].strip())
            continue
        if line.startswith("Number of "):
            break  # "Number of blocks type": pageblock counts, not free lists
        words = line.split()
        if words[:1] != ["Node"]:
            continue  # headings: "Pages per block", "Free pages count per migrate type ..."
        if len(words) < 7 or words[2] != "zone" or words[4] != "type":
            raise GuestDataRejected(
                f"{PAGETYPEINFO}: line {lineno} is not 'Node N, zone NAME, type TYPE counts...'"
            )
        node, zone = _node_zone(PAGETYPEINFO, lineno, words[1], words[3])
        migratetype = words[5]
        if not _NAME.fullmatch(migratetype) or (node, zone, migratetype) in seen:
            raise GuestDataRejected(f"{PAGETYPEINFO}: line {lineno}: bad or repeated type")
        seen.add((node, zone, migratetype))
        where = f"node {node} zone {zone} type {migratetype}"
        line_capped, counts = _counts(PAGETYPEINFO, where, words[6:], capped_ok=True)
        capped |= line_capped
        if migratetype not in totals and len(totals) == MAX_MIGRATETYPES:
            raise GuestDataRejected(f"{PAGETYPEINFO}: more than {MAX_MIGRATETYPES} migratetypes")
        total = totals.setdefault(migratetype, [0] * NR_PAGE_ORDERS)
        for order, count in enumerate(counts):
            total[order] += count
    if pageblock_order is None or pageblock_order > MAX_PAGE_ORDER:
        raise GuestDataRejected(f"{PAGETYPEINFO}: no plausible 'Page block order'")
    if not totals:
        raise GuestDataRejected(f"{PAGETYPEINFO}: no free counts per migratetype")
    by_type = tuple(MigrateFree(t, tuple(c)) for t, c in totals.items())
    return PageTypeInfo(pageblock_order, by_type, capped)
