"""The host's view of one VM: where its guest RAM is mapped, and which pages the host backs.

Public API (what the session calls)::

    view = HostView.from_qmp(pid, ramblock_text, memdevs, ram_size)   # or HostView(pid, blocks)
    result = view.scan()        # GuestRamScan | Unavailable; never raises for /proc trouble
    view.close()

``pid`` comes from ``peer_pid`` on the QMP socket, or from configuration for TCP attach.
``ramblock_text`` is the ``human-readable-text`` of ``x-query-ramblock``, ``memdevs`` the
``query-memdev`` reply, ``ram_size`` the summary's ``base-memory``.

``scan()`` re-reads ``/proc/PID/maps`` every ``MAPS_RECHECK_SECONDS`` (and on every scan while a
block is missing) and, when its text changed, locates the RAM again in case a mapping moved.
QEMU maps guest RAM once and changes it only on memory hot-plug; the session reads the layout
again on the events QMP has for that (MEMORY_DEVICE_SIZE_CHANGE, DEVICE_DELETED), which makes
the caller build a new view. The re-check catches what no event announces, within the period.
Parsing maps (about 1 ms for a few hundred mappings) costs more than scanning a small VM, hence
the period, and the compare of the text's hash before parsing.
The process's start time is checked, so a reused pid is noticed: a view is bound to one QEMU
process, and once that process is gone it only answers ``no_process`` (make a new view for a new
pid).
Method per mapping, unless one is forced: SEEK_DATA/SEEK_HOLE for RAM in a memfd, tmpfs or
hugetlbfs file (it sees the file's pages even where QEMU has no page-table entry); otherwise the
PAGEMAP_SCAN ioctl where the kernel has it, else ``/proc/PID/pagemap``, switching between the two
by which is cheaper for how fragmented the mapping was at the last scan. A block that cannot be
located is listed in ``missing`` with its reason while the others are still scanned; when no block
can be scanned the result is an ``Unavailable``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.host.maps import (
    GuestRamLayout,
    GuestRamMapping,
    Vma,
    find_backing_fd,
    join_file_vmas,
    layout_of,
    parse_maps,
    read_maps_text,
)
from daemon.host.ramblocks import GuestRamBlock, parse_ramblocks, select_guest_ram
from daemon.host.residency import (
    Method,
    Snapshot,
    pagemap_scan_supported,
    scan_pagemap,
    scan_pagemap_scan,
    scan_seek_data,
)
from daemon.host.unavailable import Reason, Unavailable, from_os_error
from daemon.model.constants import PAGE_SIZE

# statfs(2) f_type of the filesystems whose SEEK_DATA tells which pages are in memory.
TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
_MEMORY_FS = frozenset({TMPFS_MAGIC, HUGETLBFS_MAGIC})
MAPS_RECHECK_SECONDS = 10.0


@dataclass(frozen=True)
class BlockScan:
    """One guest-RAM block's mapping and its residency snapshot."""

    mapping: GuestRamMapping
    snapshot: Snapshot


@dataclass(frozen=True)
class GuestRamScan:
    """The residency of all located guest RAM of one VM."""

    pid: int
    blocks: tuple[BlockScan, ...]
    missing: tuple[tuple[str, Unavailable], ...] = ()

    @property
    def at(self) -> float:
        return max(b.snapshot.at for b in self.blocks)

    @property
    def covered_bytes(self) -> int:
        """Guest RAM this scan looked at (less than the RAM size when blocks are missing)."""
        return sum(b.snapshot.npages for b in self.blocks) * PAGE_SIZE

    @property
    def backed_bytes(self) -> int:
        """Guest RAM the host backs, in RAM or in swap."""
        return sum(b.snapshot.backed_pages for b in self.blocks) * PAGE_SIZE

    @property
    def resident_bytes(self) -> int:
        """Guest RAM in host RAM (equals ``backed_bytes`` where swap cannot be told apart)."""
        return sum(b.snapshot.resident_pages for b in self.blocks) * PAGE_SIZE

    @property
    def seconds(self) -> float:
        """Wall time of the block scans (the poll cycle charges its budget with all of a scan)."""
        return sum(b.snapshot.seconds for b in self.blocks)


def process_start_time(pid: int) -> int:
    """Field 22 of ``/proc/PID/stat`` (clock ticks after boot): tells a reused pid apart."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _libc().fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type is the first member


class HostView:
    """Locate and scan the guest RAM of one QEMU process (see the module docstring)."""

    def __init__(
        self,
        pid: int | None,
        blocks: Sequence[GuestRamBlock] | Unavailable,
        *,
        mem_paths: Mapping[str, str] | None = None,
        method: Method | None = None,
    ) -> None:
        self.pid = pid
        self.blocks = blocks
        self.mem_paths = dict(mem_paths or {})
        self.method = method
        self.layout: GuestRamLayout | None = None
        self._start_time: int | None = None
        self._maps_checked = -math.inf  # time.monotonic() of the last read of /proc/PID/maps
        self._maps_hash: int | None = None  # of the text it returned (tens of KiB: not kept)
        self._gone = False  # the process this view was made for has exited
        if pid is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self._start_time = process_start_time(pid)
        self._pagemap_fd: int | None = None
        self._file_fds: dict[str, int] = {}
        self._methods: dict[str, Method | Unavailable] = {}
        self._fingerprint: tuple[int, ...] | None = None  # taken just before the last scan

    @classmethod
    def from_qmp(
        cls,
        pid: int | None,
        ramblock_text: str | None,
        memdevs: Sequence[Mapping[str, Any]] | None,
        ram_size: int | None,
        *,
        mem_paths: Mapping[str, str] | None = None,
        method: Method | None = None,
    ) -> HostView:
        """A view from QMP replies; a reply that cannot be used makes every scan say why."""
        blocks: Sequence[GuestRamBlock] | Unavailable
        if ramblock_text is None:
            blocks = Unavailable(Reason.UNKNOWN_LAYOUT, "x-query-ramblock is not available")
        else:
            try:
                blocks = select_guest_ram(parse_ramblocks(ramblock_text), memdevs, ram_size)
            except ValueError as exc:
                blocks = Unavailable(Reason.UNKNOWN_LAYOUT, str(exc))
        return cls(pid, blocks, mem_paths=mem_paths, method=method)

    def scan(self) -> GuestRamScan | Unavailable:
        """Scan every located guest-RAM block once."""
        if self.pid is None:
            return Unavailable(
                Reason.NO_PROCESS, "QEMU's pid is unknown (over TCP it must be configured)"
            )
        if isinstance(self.blocks, Unavailable):
            return self.blocks
        pid = self.pid
        try:
            started = process_start_time(pid)
        except (OSError, ValueError, IndexError) as exc:
            self._reset()
            if isinstance(exc, OSError):
                return from_os_error(exc, f"/proc/{pid}/stat")
            return Unavailable(Reason.IO_ERROR, f"/proc/{pid}/stat: unexpected format")
        if self._gone or (self._start_time is not None and started != self._start_time):
            # Whatever runs under the pid now is not the QEMU this view was made for.
            self._gone = True
            self._reset()
            return Unavailable(Reason.NO_PROCESS, f"pid {pid} now belongs to another process")
        self._start_time = started
        layout = self.layout
        now = time.monotonic()
        if layout is None or layout.missing or now - self._maps_checked >= MAPS_RECHECK_SECONDS:
            text = read_maps_text(pid)
            if isinstance(text, Unavailable):
                self._reset()
                return text
            self._maps_checked = now
            if layout is None or layout.missing or hash(text) != self._maps_hash:
                located = self._locate(pid, parse_maps(text), layout)
                if isinstance(located, Unavailable):
                    return located
                layout = located
            self._maps_hash = hash(text)
        try:
            # Methods first: the fingerprint is of what each mapping is scanned by, so the
            # first look after the first scan can already tell "unchanged".
            for mapping in layout.mappings:
                if mapping.name not in self._methods:
                    self._methods[mapping.name] = self._choose(pid, mapping)
            self._fingerprint = self._take_fingerprint(layout)
        except (OSError, ValueError, IndexError):
            self._fingerprint = None  # the scan says why, if it is the process
        return self._scan_layout(layout)

    def unchanged(self) -> bool:
        """Whether the guest RAM is as the last scan saw it, told in a few syscalls (tens of
        microseconds, where a scan costs hundreds): the same process, the same maps when they
        are due for a re-check, and the same fingerprint (see ``_take_fingerprint``). False
        means "scan to know", never that something did change."""
        layout = self.layout
        if self.pid is None or layout is None or layout.missing or self._fingerprint is None:
            return False
        try:
            if process_start_time(self.pid) != self._start_time:
                return False
            now = time.monotonic()
            if now - self._maps_checked >= MAPS_RECHECK_SECONDS:
                text = read_maps_text(self.pid)
                if isinstance(text, Unavailable) or hash(text) != self._maps_hash:
                    return False
                self._maps_checked = now
            return self._take_fingerprint(layout) == self._fingerprint
        except (OSError, ValueError, IndexError):
            return False

    def _take_fingerprint(self, layout: GuestRamLayout) -> tuple[int, ...] | None:
        """What changes whenever the host backs guest RAM differently: the blocks a file-backed
        mapping's file holds (``st_blocks``: tmpfs and hugetlbfs count them exactly), and for
        the others the process's resident pages (``/proc/PID/statm``). The latter is the sum of
        per-CPU counters and may lag by a few dozen pages per CPU, less than the smallest block
        reporting returns (2 MiB); an equal number of pages discarded and refaulted between two
        looks also escapes it, so the caller still scans now and then. None: cannot tell."""
        parts: list[int] = []
        need_rss = False
        for mapping in layout.mappings:
            fd = self._file_fds.get(mapping.name)
            if fd is not None and self._methods.get(mapping.name) is Method.SEEK_DATA:
                parts.append(os.fstat(fd).st_blocks)
            else:
                need_rss = True
        if need_rss:
            assert self.pid is not None
            with open(f"/proc/{self.pid}/statm", "rb") as f:
                parts.append(int(f.read().split()[1]))
        return tuple(parts) if parts else None

    def _locate(
        self, pid: int, vmas: Sequence[Vma], layout: GuestRamLayout | None
    ) -> GuestRamLayout | Unavailable:
        """The RAM's layout in ``vmas``: the current one while nothing moved, else found again.

        Locates again while some block is missing (it may appear: QEMU still starting, memory
        hot-plugged); keeps the open descriptors if nothing moved.
        """
        if layout is not None and not layout.missing and _still_mapped(layout, vmas):
            return layout
        assert not isinstance(self.blocks, Unavailable)  # scan() has returned it already
        located = layout_of(pid, vmas, self.blocks, self.mem_paths)
        if isinstance(located, Unavailable):
            self._reset()
            return located
        if layout is None or located.mappings != layout.mappings:
            self._reset()
        self.layout = located
        return located

    def _scan_layout(self, layout: GuestRamLayout) -> GuestRamScan | Unavailable:
        scans: list[BlockScan] = []
        missing = list(layout.missing)
        for mapping in layout.mappings:
            result = self._scan_one(layout.pid, mapping)
            if isinstance(result, Unavailable):
                if result.reason in (Reason.NO_PROCESS, Reason.NO_PERMISSION):
                    self._reset()
                    return result
                missing.append((mapping.name, result))
            else:
                scans.append(BlockScan(mapping, result))
        if not scans:
            return Unavailable(
                missing[0][1].reason, "; ".join(u.detail for _, u in missing) or "no guest RAM"
            )
        return GuestRamScan(layout.pid, tuple(scans), tuple(missing))

    def _scan_one(self, pid: int, mapping: GuestRamMapping) -> Snapshot | Unavailable:
        what = f"/proc/{pid}/pagemap"
        try:
            method = self._methods.get(mapping.name)
            if method is None:
                method = self._methods[mapping.name] = self._choose(pid, mapping)
            if isinstance(method, Unavailable):
                return method
            if method is Method.SEEK_DATA:
                what = f"SEEK_DATA on the backing file of {mapping.name!r}"
                fd = self._file_fds[mapping.name]
                return scan_seek_data(fd, mapping.file_offset, mapping.npages)
            if self._pagemap_fd is None:
                self._pagemap_fd = os.open(what, os.O_RDONLY | os.O_CLOEXEC)
            scanner = scan_pagemap_scan if method is Method.PAGEMAP_SCAN else scan_pagemap
            snap = scanner(self._pagemap_fd, mapping.start, mapping.npages)
            if self.method is None:
                self._methods[mapping.name] = _cheaper(snap)
            return snap
        except OSError as exc:
            return from_os_error(exc, what)

    def _choose(self, pid: int, mapping: GuestRamMapping) -> Method | Unavailable:
        forced = self.method
        if forced is Method.PAGEMAP_SCAN and not pagemap_scan_supported():
            return Unavailable(Reason.UNSUPPORTED, "this kernel has no PAGEMAP_SCAN (Linux 6.7+)")
        if forced in (None, Method.SEEK_DATA) and mapping.fd_backed:
            fd_no = find_backing_fd(pid, mapping)
            if fd_no is not None:
                fd = os.open(f"/proc/{pid}/fd/{fd_no}", os.O_RDONLY | os.O_CLOEXEC)
                if forced is Method.SEEK_DATA or _fs_type(fd) in _MEMORY_FS:
                    self._file_fds[mapping.name] = fd
                    return Method.SEEK_DATA
                os.close(fd)
        if forced is Method.SEEK_DATA:
            return Unavailable(
                Reason.UNSUPPORTED,
                f"RAM block {mapping.name!r} has no open backing file for SEEK_DATA",
            )
        if forced is not None:
            return forced
        return Method.PAGEMAP_SCAN if pagemap_scan_supported() else Method.PAGEMAP

    def _reset(self) -> None:
        self.layout = None
        self._fingerprint = None
        self._methods.clear()
        for fd in self._file_fds.values():
            os.close(fd)
        self._file_fds.clear()
        if self._pagemap_fd is not None:
            os.close(self._pagemap_fd)
            self._pagemap_fd = None

    def close(self) -> None:
        """Close the descriptors the view holds; a later ``scan()`` opens them again."""
        self._reset()


def _cheaper(snap: Snapshot) -> Method:
    """The page-table method to use next for a mapping that looks like ``snap``.

    PAGEMAP_SCAN costs per returned range, pagemap per page (bench/RESULTS-scan.md: a 512 MiB
    mapping with every other page resident takes 6.6 ms with PAGEMAP_SCAN, 1.4 ms with pagemap;
    dense or sparse ones take a fraction of pagemap's time). Switch to pagemap when runs are
    short on average, back when they are long, with a gap between so a mapping does not flap.
    """
    if snap.method is Method.PAGEMAP_SCAN and snap.runs * 16 > snap.npages:
        return Method.PAGEMAP
    if snap.method is Method.PAGEMAP and snap.runs * 64 < snap.npages and pagemap_scan_supported():
        return Method.PAGEMAP_SCAN
    return snap.method


def _still_mapped(layout: GuestRamLayout, vmas: Sequence[Vma]) -> bool:
    present = {(v.start, v.size, v.inode) for v in join_file_vmas(vmas)}
    return all((m.start, m.size, m.inode) in present for m in layout.mappings)
