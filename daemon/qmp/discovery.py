"""Watched glob of QMP sockets: VMs appear and disappear as their sockets do.

Polling the glob (every few seconds) rather than inotify keeps this portable and cheap: a glob
of a few hundred sockets costs well under a millisecond.
"""

from __future__ import annotations

import asyncio
import glob
import stat
from collections.abc import Callable
from pathlib import Path

from daemon.untrusted import vm_name


def vm_name_for(path: Path, taken: set[str]) -> str:
    """Name a VM after its socket: ``/run/qemu/web1.qmp`` -> ``web1``; unique among ``taken``.

    Whoever can create files in the watched directory chooses the name, so it is reduced to
    the characters of configured names (``daemon.untrusted.vm_name``).
    """
    stem = path.stem if path.suffix in (".qmp", ".sock", ".socket", ".mon") else path.name
    name = vm_name(stem) or "socket"
    if name in taken:
        name = vm_name(f"{path.parent.name}-{name}") or name
    base, n = name, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def sockets_matching(pattern: str) -> set[Path]:
    """Existing Unix sockets matching the glob (other files are ignored)."""
    found: set[Path] = set()
    for entry in glob.glob(pattern):
        try:
            if stat.S_ISSOCK(Path(entry).stat().st_mode):
                found.add(Path(entry))
        except OSError:
            continue  # vanished between glob and stat
    return found


class SocketWatcher:
    """Calls ``appeared(name, path)`` and ``vanished(name)`` as sockets come and go."""

    def __init__(
        self,
        pattern: str,
        *,
        appeared: Callable[[str, Path], None],
        vanished: Callable[[str], None],
        interval: float = 2.0,
    ) -> None:
        self.pattern = pattern
        self.appeared = appeared
        self.vanished = vanished
        self.interval = interval
        self.known: dict[Path, str] = {}

    def scan(self) -> None:
        current = sockets_matching(self.pattern)
        for path in sorted(set(self.known) - current):
            self.vanished(self.known.pop(path))
        for path in sorted(current - set(self.known)):
            name = vm_name_for(path, set(self.known.values()))
            self.known[path] = name
            self.appeared(name, path)

    async def run(self) -> None:
        while True:
            self.scan()
            await asyncio.sleep(self.interval)
