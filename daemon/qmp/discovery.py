"""Watched glob of QMP sockets: VMs appear and disappear as their sockets do.

The glob is looked at every ``interval`` seconds (a glob of a few hundred sockets costs well
under a millisecond), and at once when anything changes in the directory it starts from:
inotify, through ``watchfiles``, so a new QEMU is attached as soon as its socket is there.
Without inotify (a directory that does not exist yet, the watch limit reached) the looks on the
interval still find everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import re
import stat
from collections.abc import Callable
from pathlib import Path

from watchfiles import awatch

from daemon.untrusted import vm_name

log = logging.getLogger(__name__)

WATCH_RETRY = 10.0  # seconds before watching a directory again that could not be watched
MIN_RECURSIVE_PARTS = 3  # a recursive watch needs a root at least as deep as /run/qemu


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


def watched_directory(pattern: str) -> tuple[Path, bool]:
    """The directory a glob starts from (its deepest part without a wildcard), and whether a
    match can lie deeper than its entries (a wildcard in a directory part)."""
    parts = Path(pattern).parts
    for i, part in enumerate(parts):
        if re.search(r"[*?[]", part):
            return Path(*parts[:i]), i < len(parts) - 1
    return Path(pattern).parent, False


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
        changed = asyncio.Event()
        watching = asyncio.create_task(self._watch(changed), name="socket-glob-inotify")
        try:
            while True:
                self.scan()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.interval)
                changed.clear()
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching

    async def _watch(self, changed: asyncio.Event) -> None:
        """Set ``changed`` whenever something changes under the glob's directory."""
        root, recursive = watched_directory(self.pattern)
        if recursive and len(root.parts) < MIN_RECURSIVE_PARTS:
            # "/*/qmp.sock" would watch the whole file system: the looks on the interval only.
            log.info("not watching %s recursively: looking every %g s", root, self.interval)
            return
        while True:
            try:
                async for _ in awatch(
                    root, watch_filter=None, recursive=recursive, debounce=200, step=20
                ):
                    changed.set()
            except (OSError, RuntimeError) as exc:  # not there yet, no inotify, watch limits
                log.debug("not watching %s (%s): looking every %g s", root, exc, self.interval)
            await asyncio.sleep(WATCH_RETRY)
