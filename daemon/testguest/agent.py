"""The real QEMU guest agent for the test guest: Debian's ``qemu-ga`` and the shared libraries
``ldd`` lists for it, taken from the host's installation (package ``qemu-guest-agent``).

Taken from the host, like busybox, rather than downloaded: installing the package makes apt
install exactly the libraries the binary needs, and ``ldd`` then names them; a downloaded
``.deb`` would bring the binary without its libraries, whose packages (and their own
dependencies) would have to be resolved and unpacked by hand. Its systemd unit only starts
on a machine that has an ``org.qemu.guest_agent.0`` port, so the package does nothing on a host.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from daemon.testguest.errors import GuestBuildError

GUEST_PATH = "usr/sbin/qemu-ga"
PORT_NAME = "org.qemu.guest_agent.0"
_CANDIDATES = ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga")
# "\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x...)" and the loader line
# "\t/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
_LDD_RESOLVED = re.compile(r"^\s*\S+\s+=>\s+(?P<path>/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_LOADER = re.compile(r"^\s*(?P<path>/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_MISSING = re.compile(r"^\s*(?P<name>\S+)\s+=>\s+not found\s*$")


@dataclass(frozen=True)
class AgentFiles:
    """``qemu-ga`` and its libraries, each as (path in the guest without the leading slash,
    content). Libraries go to the path ``ldd`` printed, so the guest's loader finds them
    where the host's did."""

    binary: bytes
    libraries: tuple[tuple[str, bytes], ...]

    def digest(self) -> str:
        h = hashlib.sha256(self.binary)
        for path, data in self.libraries:
            h.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()


def find_qemu_ga(path: Path | None = None) -> Path:
    """``path``, or the qemu-ga the host has installed."""
    if path is not None:
        candidates = [path]
    else:
        found = shutil.which("qemu-ga")
        candidates = [Path(p) for p in (found, *_CANDIDATES) if p]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise GuestBuildError(
        f"qemu-ga not found (tried {[str(c) for c in candidates]}); install qemu-guest-agent "
        "(the test guest carries the host's qemu-ga and its libraries)"
    )


def parse_ldd(output: str) -> list[str]:
    """The library paths in ``ldd`` output, the loader included. Raises ``GuestBuildError``
    for a library ldd could not find."""
    missing = [m["name"] for line in output.splitlines() if (m := _LDD_MISSING.match(line))]
    if missing:
        raise GuestBuildError(f"qemu-ga needs libraries that are not installed: {missing}")
    paths: list[str] = []
    for line in output.splitlines():
        found = _LDD_RESOLVED.match(line) or _LDD_LOADER.match(line)
        if found and found["path"] not in paths:
            paths.append(found["path"])
    return paths


def library_paths(binary: Path) -> list[str]:
    """What ``ldd`` lists for ``binary``; none for a statically linked one."""
    if shutil.which("ldd") is None:
        raise GuestBuildError("ldd not found (package libc-bin)")
    done = subprocess.run(
        ["ldd", str(binary)],
        capture_output=True,
        text=True,
        env=dict(os.environ, LC_ALL="C"),
        check=False,
    )
    if done.returncode != 0:
        if "not a dynamic executable" in done.stdout + done.stderr:
            return []
        raise GuestBuildError(f"ldd {binary} failed:\n{(done.stdout + done.stderr).strip()}")
    return parse_ldd(done.stdout)


def agent_files(path: Path | None = None) -> AgentFiles:
    """The guest agent binary and its libraries, read from the host."""
    binary = find_qemu_ga(path)
    libraries = tuple(
        (lib.lstrip("/"), Path(lib).resolve().read_bytes()) for lib in library_paths(binary)
    )
    return AgentFiles(binary.read_bytes(), libraries)
