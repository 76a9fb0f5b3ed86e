"""The pid of a libvirt domain's QEMU process, for the host view.

libvirt's API does not expose it. The QEMU driver writes it to ``<state dir>/NAME.pid``
(``/run/libvirt/qemu`` for ``qemu:///system``, with the monolithic libvirtd and with
virtqemud alike) and starts QEMU with ``-uuid UUID``. A pid file can be stale (QEMU gone, pid
reused), so the pid counts only when that process's command line carries the domain's UUID.
Where the state directory is not visible (a container without it mounted, but with the host's
pid namespace), the same check finds the process by scanning ``/proc``.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_STATE_DIR", "find_qemu_pid", "qemu_pid_of"]

DEFAULT_STATE_DIR: Final = Path("/run/libvirt/qemu")
# A QEMU command line is a few KiB; libvirt's with many devices stays well below this.
MAX_CMDLINE: Final = 256 * 1024
MAX_PIDFILE: Final = 64


def _cmdline(proc: Path, pid: int) -> list[bytes] | None:
    try:
        with (proc / str(pid) / "cmdline").open("rb") as f:
            raw = f.read(MAX_CMDLINE)
    except OSError:
        return None
    return raw.split(b"\0")


def qemu_pid_of(pid: int, uuid: str, proc: Path = Path("/proc")) -> bool:
    """Whether process ``pid`` is a QEMU started with ``-uuid UUID`` (case-insensitive)."""
    args = _cmdline(proc, pid)
    if not args:
        return False
    wanted = uuid.lower().encode()
    return any(a == b"-uuid" and b.lower() == wanted for a, b in itertools.pairwise(args))


def _from_pidfile(state_dir: Path, name: str) -> int | None:
    # Domain names never contain "/" (libvirt refuses them), but this is a path: make sure.
    if not name or "/" in name or name.startswith("."):
        return None
    try:
        with (state_dir / f"{name}.pid").open("rb") as f:
            text = f.read(MAX_PIDFILE).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 2**22 else None


def find_qemu_pid(
    name: str,
    uuid: str,
    *,
    state_dir: Path | None = DEFAULT_STATE_DIR,
    proc: Path = Path("/proc"),
    scan: bool = True,
) -> int | None:
    """The pid of the running QEMU of domain ``name``/``uuid``, or None.

    Tries ``state_dir/NAME.pid`` first (skipped when ``state_dir`` is None); then, with
    ``scan``, every process in ``proc``. Blocking file I/O: call it in a worker thread.
    """
    if state_dir is not None:
        pid = _from_pidfile(state_dir, name)
        if pid is not None and qemu_pid_of(pid, uuid, proc):
            return pid
    if not scan:
        return None
    with contextlib.suppress(OSError):
        for entry in proc.iterdir():
            if entry.name.isdigit() and qemu_pid_of(int(entry.name), uuid, proc):
                return int(entry.name)
    return None
