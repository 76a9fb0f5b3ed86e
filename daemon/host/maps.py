"""Which mappings of a QEMU process hold guest RAM: ``/proc/PID/maps`` matched to RAM blocks.

``locate_guest_ram(pid, blocks)`` returns a ``GuestRamLayout`` (each located block with the rule
that matched it, and each block that could not be located with the reason) or ``Unavailable``
when nothing can be located: the process is gone, ``/proc`` refuses us, or no block matches.

Rules, tried in this order for each guest-RAM block of ``Total`` bytes:

- ``file-path``: a file mapping of the backend's ``mem-path`` (when the caller knows it, from
  ``qom-get /objects/ID mem-path``), of the block's size.
- ``memfd-name``: a ``/memfd:memory-backend-memfd (deleted)`` mapping of the block's size. QEMU
  names every memfd after the backend type, not the id, so the size tells backends apart.
- ``anon-size``: an anonymous read-write mapping of exactly the block's size (default RAM;
  ``/dev/zero (deleted)`` is how an anonymous shared mapping, ``share=on``, shows).
- ``file-size``: any other read-write file mapping of the block's size (``memory-backend-file``
  whose path is not known).

A mapping must also be shared (``rw-s``) exactly when ``query-memdev`` says the backend has
``share=on``. A rule that leaves two or more candidates for a block does not guess: the block is
reported as ``ambiguous_layout``. Adjacent mappings of the same file at consecutive offsets are
joined first, since the kernel splits a file mapping when part of it changes attributes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from daemon.host.ramblocks import GuestRamBlock
from daemon.host.unavailable import Reason, Unavailable, from_os_error
from daemon.model.constants import PAGE_SIZE

MEMFD_NAME = "/memfd:memory-backend-memfd (deleted)"
SHARED_ANON_NAME = "/dev/zero (deleted)"

MatchRule = Literal["file-path", "memfd-name", "anon-size", "file-size"]
RULES: tuple[MatchRule, ...] = ("file-path", "memfd-name", "anon-size", "file-size")


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def writable(self) -> bool:
        return self.perms[:2] == "rw"


@dataclass(frozen=True)
class GuestRamMapping:
    """Where one guest-RAM block lives in QEMU's address space."""

    block: GuestRamBlock
    start: int  # virtual address in the QEMU process
    size: int
    rule: MatchRule
    path: str  # as /proc/PID/maps shows it; "" for private anonymous memory
    dev: tuple[int, int]
    inode: int  # 0 for private anonymous memory
    file_offset: int
    shared: bool  # MAP_SHARED ("rw-s"): writes go to the file, not to private copies

    @property
    def name(self) -> str:
        return self.block.name

    @property
    def fd_backed(self) -> bool:
        """The guest's pages live in a file or memfd, where SEEK_DATA/SEEK_HOLE can see them.

        Not for anonymous memory, and not for a private file mapping (``share=off``), whose
        written pages are private anonymous copies.
        """
        return self.shared and self.inode != 0 and self.path != SHARED_ANON_NAME

    @property
    def npages(self) -> int:
        """4 KiB pages of guest RAM: the block's used length."""
        return self.block.block.used // PAGE_SIZE


@dataclass(frozen=True)
class GuestRamLayout:
    """The located guest-RAM blocks of one process, and the blocks that could not be located."""

    pid: int
    mappings: tuple[GuestRamMapping, ...]
    missing: tuple[tuple[str, Unavailable], ...] = ()


def parse_maps(text: str) -> list[Vma]:
    """Parse ``/proc/PID/maps``; lines that do not fit the format are skipped."""
    vmas = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        try:
            lo, hi = fields[0].split("-")
            major, minor = fields[3].split(":")
            vmas.append(
                Vma(
                    start=int(lo, 16),
                    end=int(hi, 16),
                    perms=fields[1],
                    offset=int(fields[2], 16),
                    dev=(int(major, 16), int(minor, 16)),
                    inode=int(fields[4]),
                    path=fields[5].strip() if len(fields) > 5 else "",
                )
            )
        except ValueError:
            continue
    return vmas


def read_maps(pid: int) -> list[Vma] | Unavailable:
    """The mappings of ``pid``, or why they cannot be read."""
    text = read_maps_text(pid)
    return text if isinstance(text, Unavailable) else parse_maps(text)


def read_maps_text(pid: int) -> str | Unavailable:
    """``/proc/PID/maps`` unparsed: reading costs a tenth of parsing, so compare it first."""
    path = f"/proc/{pid}/maps"
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        return from_os_error(exc, path)


def join_file_vmas(vmas: Sequence[Vma]) -> list[Vma]:
    """Join adjacent mappings of the same file at consecutive offsets (anonymous ones stay)."""
    joined: list[Vma] = []
    for vma in vmas:
        last = joined[-1] if joined else None
        if (
            last is not None
            and vma.inode != 0
            and (last.inode, last.dev, last.path) == (vma.inode, vma.dev, vma.path)
            and last.end == vma.start
            and last.offset + last.size == vma.offset
            and last.writable == vma.writable
        ):
            joined[-1] = replace(last, end=vma.end)
        else:
            joined.append(vma)
    return joined


def _fits(rule: MatchRule, vma: Vma, block: GuestRamBlock, mem_path: str | None) -> bool:
    if not vma.writable or vma.size != block.block.total:
        return False
    if block.share is not None and (vma.perms[3:4] == "s") != block.share:
        return False  # query-memdev's share=on|off is MAP_SHARED|MAP_PRIVATE
    if rule == "file-path":
        return mem_path is not None and vma.path in (mem_path, f"{mem_path} (deleted)")
    if rule == "memfd-name":
        return vma.path == MEMFD_NAME
    if rule == "anon-size":
        return (vma.inode == 0 and vma.path == "") or vma.path == SHARED_ANON_NAME
    return vma.inode != 0 and vma.path.startswith("/") and vma.path != SHARED_ANON_NAME


def match_guest_ram(
    vmas: Sequence[Vma],
    blocks: Sequence[GuestRamBlock],
    mem_paths: Mapping[str, str] | None = None,
) -> tuple[list[GuestRamMapping], list[tuple[str, Unavailable]]]:
    """Match guest-RAM blocks to mappings (pure; see the module docstring for the rules)."""
    candidates = join_file_vmas(vmas)
    claimed: set[int] = set()
    found: list[GuestRamMapping] = []
    missing: list[tuple[str, Unavailable]] = []
    paths = mem_paths or {}
    # Blocks with a known path first, so a path match is never taken by a size rule.
    for block in sorted(blocks, key=lambda b: b.name not in paths):
        mem_path = paths.get(block.name)
        rules = ("file-path",) if mem_path else RULES[1:]
        for rule in rules:
            fits = [
                v for v in candidates if v.start not in claimed and _fits(rule, v, block, mem_path)
            ]
            if len(fits) == 1:
                v = fits[0]
                claimed.add(v.start)
                shared = v.perms[3:4] == "s"
                found.append(
                    GuestRamMapping(
                        block, v.start, v.size, rule, v.path, v.dev, v.inode, v.offset, shared
                    )
                )
                break
            if len(fits) > 1:
                where = ", ".join(f"{v.start:#x}" for v in fits)
                missing.append(
                    (
                        block.name,
                        Unavailable(
                            Reason.AMBIGUOUS_LAYOUT,
                            f"RAM block {block.name!r}: rule {rule} matches {len(fits)} "
                            f"mappings of {block.block.total} bytes (at {where})",
                        ),
                    )
                )
                break
        else:
            what = f"of {mem_path}" if mem_path else "memfd, anonymous or file"
            missing.append(
                (
                    block.name,
                    Unavailable(
                        Reason.UNKNOWN_LAYOUT,
                        f"RAM block {block.name!r}: no writable {what} mapping of "
                        f"{block.block.total} bytes",
                    ),
                )
            )
    return sorted(found, key=lambda m: m.block.block.offset), missing


def locate_guest_ram(
    pid: int, blocks: Sequence[GuestRamBlock], mem_paths: Mapping[str, str] | None = None
) -> GuestRamLayout | Unavailable:
    """Read ``/proc/PID/maps`` and match the guest-RAM ``blocks`` (see the module docstring)."""
    vmas = read_maps(pid)
    if isinstance(vmas, Unavailable):
        return vmas
    return layout_of(pid, vmas, blocks, mem_paths)


def layout_of(
    pid: int,
    vmas: Sequence[Vma],
    blocks: Sequence[GuestRamBlock],
    mem_paths: Mapping[str, str] | None = None,
) -> GuestRamLayout | Unavailable:
    """``locate_guest_ram`` on mappings already read."""
    found, missing = match_guest_ram(vmas, blocks, mem_paths)
    if not found:
        if len(missing) == 1:
            return missing[0][1]
        reasons = {u.reason for _, u in missing}
        reason = reasons.pop() if len(reasons) == 1 else Reason.UNKNOWN_LAYOUT
        return Unavailable(reason, "; ".join(u.detail for _, u in missing) or "no guest RAM")
    return GuestRamLayout(pid, tuple(found), tuple(missing))


def find_backing_fd(pid: int, mapping: GuestRamMapping) -> int | None:
    """The number of QEMU's open fd for ``mapping``'s file or memfd, found by device and inode.

    None when QEMU has closed it (a ``memory-backend-file`` may be mapped with no fd kept open) or
    when ``/proc/PID/fd`` cannot be read.
    """
    if not mapping.fd_backed:
        return None
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(f"{base}/{name}")
        except OSError:
            continue
        if st.st_ino == mapping.inode and (os.major(st.st_dev), os.minor(st.st_dev)) == mapping.dev:
            return int(name)
    return None
