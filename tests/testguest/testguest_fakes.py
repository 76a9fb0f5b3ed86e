"""Fakes for the test guest's unit tests: a kernel package built with the real dpkg-deb, apt
commands that serve it, and ELF headers. Nothing here boots QEMU or reaches a registry."""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from daemon.testguest.agent import AgentFiles
from daemon.testguest.kernel import MODULES

RELEASE = "9.9.9-1-amd64"
PACKAGE = f"linux-image-{RELEASE}"
VERSION = "9.9.9-1"
VMLINUZ = b"fake bzImage " * 100


def elf_header(interpreter: bool) -> bytes:
    """A minimal ELF64 file with one program header: PT_INTERP (3) if dynamic, else PT_LOAD."""
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 3 if interpreter else 1)
    return bytes(header + phdr)


# A guest agent "binary" with one "library", standing in for the host's qemu-ga.
FAKE_AGENT = AgentFiles(
    b"fake qemu-ga",
    (("lib/x86_64-linux-gnu/libfake.so.1", b"fake lib"), ("lib64/ld-linux-x86-64.so.2", b"ld")),
)


def fake_module(name: str, depends: list[str]) -> bytes:
    # What matters to the builder: the .modinfo strings, NUL-separated, among other bytes.
    return b"\x7fELF\x02junk\0" + f"name={name}\0depends={','.join(depends)}\0".encode()


MODULE_DEPENDS = {
    "virtio_ring": [],
    "virtio": ["virtio_ring"],
    "virtio_pci_legacy_dev": [],
    "virtio_pci_modern_dev": [],
    "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"],
    "virtio_balloon": ["virtio", "virtio_ring"],
    "virtio_mem": ["virtio", "virtio_ring"],
    "virtio_console": ["virtio", "virtio_ring"],
}
# Where the kernel package keeps each module (drivers/virtio/ unless named here).
MODULE_DIRS = {"virtio_console": "char"}


def build_deb(
    where: Path, modules: dict[str, bytes], xz: frozenset[str] = frozenset(), usr: bool = False
) -> Path:
    """A kernel package with ``modules`` (those in ``xz`` compressed), built by dpkg-deb."""

    root = where / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: amd64\n"
        "Maintainer: nobody <nobody@example.org>\nDescription: fake kernel\n"
    )
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{RELEASE}").write_bytes(VMLINUZ)
    lib = root / ("usr/lib" if usr else "lib")
    drivers = lib / "modules" / RELEASE / "kernel" / "drivers"
    for subdir in ("virtio", "char"):
        (drivers / subdir).mkdir(parents=True)
    (drivers / "virtio" / "virtio_input.ko").write_bytes(fake_module("virtio_input", ["virtio"]))
    (drivers / "char" / "ipmi_msghandler.ko").write_bytes(fake_module("ipmi_msghandler", []))
    for name, data in modules.items():
        module_dir = drivers / MODULE_DIRS.get(name, "virtio")
        if name in xz:
            (module_dir / f"{name}.ko.xz").write_bytes(lzma.compress(data))
        else:
            (module_dir / f"{name}.ko").write_bytes(data)
    deb = where / f"{PACKAGE}_{VERSION}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(root)
    return deb


def all_modules() -> dict[str, bytes]:
    return {m: fake_module(m, MODULE_DEPENDS[m]) for m in MODULES}


FAKE_APT_CACHE = """#!/bin/sh
echo "apt-cache $*" >>"$FAKE_APT/log"
[ -e "$FAKE_APT/empty" ] && { echo "E: No packages found" >&2; exit 100; }
case "$*" in
"show --no-all-versions linux-image-amd64")
	depends=$(cat "$FAKE_APT/depends")
	printf 'Package: linux-image-amd64\nVersion: 9.9.9-1\nDepends: %s\n' "$depends" ;;
"show --no-all-versions @PACKAGE@")
	printf 'Package: @PACKAGE@\nVersion: @VERSION@\nDescription: fake\n multi-line: x\n' ;;
*) echo "E: No packages found" >&2; exit 100 ;;
esac
"""

FAKE_APT_GET = """#!/bin/sh
echo "apt-get $*" >>"$FAKE_APT/log"
case "$*" in
*update*) rm -f "$FAKE_APT/empty" ;;
*download*@PACKAGE@=@VERSION@*)
	[ -e "$FAKE_APT/fail" ] && { echo "E: Failed to fetch" >&2; exit 100; }
	[ -e "$FAKE_APT/slow" ] && sleep 0.5
	cp "$FAKE_APT/kernel.deb" "@PACKAGE@_@VERSION@_amd64.deb" ;;
*) echo "E: unexpected" >&2; exit 100 ;;
esac
"""


@dataclass
class FakeApt:
    """apt-cache and apt-get scripts first on PATH, serving one fake kernel package."""

    root: Path

    def calls(self, tool: str = "") -> list[str]:
        log = self.root / "log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line for line in lines if line.startswith(tool)]

    def downloads(self) -> int:
        return sum(" download " in line for line in self.calls("apt-get"))

    def flag(self, name: str, on: bool = True) -> None:
        path = self.root / name
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def set_depends(self, text: str) -> None:
        (self.root / "depends").write_text(text)
