"""A gzip-compressed ``newc`` cpio archive, the format the kernel unpacks as its initramfs.

Written here rather than with ``cpio -o`` so the build needs no root (``/dev/console`` is a device
node) and no extra tool, and so the same inputs give the same bytes (fixed inode numbers, mtime 0).
See the kernel's Documentation/driver-api/early-userspace/buffer-format.rst.
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``path`` is relative (no leading slash), as the kernel expects."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> Entry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return cls(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(ino: int, entry: Entry) -> bytes:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check (only used by the "070702" crc format)
    )
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def newc_archive(entries: list[Entry]) -> bytes:
    """The uncompressed archive: members in the given order (parents before children), then
    the trailer."""
    out = io.BytesIO()
    for ino, entry in enumerate(entries, start=1):
        if entry.path.startswith("/") or not entry.path:
            raise ValueError(f"archive paths must be relative and non-empty: {entry.path!r}")
        out.write(_member(ino, entry))
    out.write(_member(0, Entry(TRAILER, 0)))
    return out.getvalue()


def gzip_initramfs(entries: list[Entry]) -> bytes:
    """The archive gzip-compressed with a zero timestamp, ready for ``qemu -initrd``."""
    return gzip.compress(newc_archive(entries), compresslevel=6, mtime=0)
