"""The newc writer, checked against the real cpio tool."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.testguest.initramfs import Entry, gzip_initramfs, newc_archive

ENTRIES = [
    Entry.directory("bin"),
    Entry.directory("dev"),
    Entry.char_device("dev/console", 5, 1),
    Entry.file("bin/tool", b"\x7fELF" + bytes(range(256)) * 3, 0o755),
    Entry.file("init", b"#!/bin/sh\n", 0o755),
    # Sizes 0..3 past a multiple of 4 exercise the padding.
    Entry.file("a", b""),
    Entry.file("ab", b"x"),
    Entry.file("abc", b"xy"),
    Entry.file("abcd", b"xyz"),
]


def cpio(args: list[str], archive: bytes, cwd: Path) -> str:
    if shutil.which("cpio") is None:
        pytest.fail("cpio not found: it checks the archive format here (install cpio)")
    done = subprocess.run(["cpio", *args], input=archive, cwd=cwd, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def test_cpio_lists_every_member_with_its_type(tmp_path: Path) -> None:
    listing = cpio(["-t", "-v", "--quiet"], newc_archive(ENTRIES), tmp_path).splitlines()
    assert [line.split()[-1] for line in listing] == [e.path for e in ENTRIES]
    console = next(line for line in listing if line.endswith("dev/console"))
    assert console.startswith("crw-------")
    assert "5,   1" in console or "5, 1" in console
    tool = next(line for line in listing if line.endswith("bin/tool"))
    assert tool.startswith("-rwxr-xr-x")


def test_cpio_extracts_the_same_bytes(tmp_path: Path) -> None:
    files = [e for e in ENTRIES if e.mode & 0o100000 and not e.mode & 0o040000]
    archive = gzip.decompress(gzip_initramfs(ENTRIES))
    cpio(["-i", "-d", "--quiet", *[e.path for e in files]], archive, tmp_path)
    for entry in files:
        assert (tmp_path / entry.path).read_bytes() == entry.data, entry.path


def test_same_entries_give_the_same_bytes() -> None:
    assert gzip_initramfs(ENTRIES) == gzip_initramfs(list(ENTRIES))


def test_members_and_data_are_aligned_to_four_bytes() -> None:
    archive = newc_archive(ENTRIES)
    assert len(archive) % 4 == 0
    # Every header starts on a 4-byte boundary: find them by magic.
    offsets = [i for i in range(0, len(archive), 4) if archive[i : i + 6] == b"070701"]
    assert len(offsets) == len(ENTRIES) + 1  # and the trailer
    assert archive[offsets[-1] + 110 :].startswith(b"TRAILER!!!\0")


@pytest.mark.parametrize("path", ["/init", ""])
def test_absolute_or_empty_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="relative"):
        newc_archive([Entry.file(path, b"")])
