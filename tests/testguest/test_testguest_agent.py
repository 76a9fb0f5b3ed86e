"""Finding the host's qemu-ga and the libraries ldd lists for it (real ldd, real binaries)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from daemon.testguest.agent import agent_files, find_qemu_ga, library_paths, parse_ldd
from daemon.testguest.errors import GuestBuildError

# ldd /usr/sbin/qemu-ga on Debian 12 (qemu-guest-agent 1:7.2+dfsg-7).
LDD_QEMU_GA = """\
\tlinux-vdso.so.1 (0x00007fb1bffe2000)
\tlibudev.so.1 => /lib/x86_64-linux-gnu/libudev.so.1 (0x00007fb1bfeab000)
\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007fb1bfd5f000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fb1bfa95000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007fb1bffe4000)
\tlibpcre2-8.so.0 => /lib/x86_64-linux-gnu/libpcre2-8.so.0 (0x00007fb1bf9fb000)
"""


def test_parse_ldd_keeps_files_and_the_loader() -> None:
    assert parse_ldd(LDD_QEMU_GA) == [
        "/lib/x86_64-linux-gnu/libudev.so.1",
        "/lib/x86_64-linux-gnu/libglib-2.0.so.0",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/libpcre2-8.so.0",
    ]


def test_parse_ldd_names_missing_libraries() -> None:
    with pytest.raises(GuestBuildError, match=r"not installed: \['liburing.so.2'\]"):
        parse_ldd(LDD_QEMU_GA + "\tliburing.so.2 => not found\n")


def test_library_paths_of_real_binaries() -> None:
    paths = library_paths(Path(sys.executable).resolve())
    assert any(Path(p).name == "libc.so.6" for p in paths)
    assert any(Path(p).name.startswith("ld-linux") for p in paths)
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox not found: install busybox-static")
    assert library_paths(Path(busybox)) == []  # static: nothing to copy


def test_the_hosts_qemu_ga_and_its_libraries() -> None:
    try:
        files = agent_files()
    except GuestBuildError as exc:
        pytest.fail(f"{exc} (deploy/install-deps.sh installs it)", pytrace=False)
    assert files.binary.startswith(b"\x7fELF")
    names = {Path(path).name for path, _ in files.libraries}
    assert {"libglib-2.0.so.0", "libc.so.6", "ld-linux-x86-64.so.2"} <= names
    assert all(not path.startswith("/") for path, _ in files.libraries)
    assert all(data.startswith(b"\x7fELF") for _, data in files.libraries)
    assert files.digest() == agent_files().digest()


def test_a_missing_qemu_ga_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(GuestBuildError, match="install qemu-guest-agent"):
        find_qemu_ga(tmp_path / "qemu-ga")
