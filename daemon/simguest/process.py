"""Running simulated guests as processes: one guest per process, as QEMU runs one VM.

``run_guest`` runs one guest in this process until it exits (``quit``, guest power-off,
SIGTERM or SIGINT, which it answers like QEMU with a ``SHUTDOWN`` event of reason
``host-signal``).

``run_fleet`` starts many guests cheaply: this process loads everything once, then forks one
child per guest. Each child is a separate process with its own pid, memfd and sockets, so the
host view sees exactly what it sees of N QEMUs, while the pages of the loaded interpreter
stay shared copy-on-write. The parent forwards SIGTERM/SIGINT to every child and waits for
them; each child also dies with the parent (``PR_SET_PDEATHSIG``), so none is left behind.

Readiness: with ``ready_fd`` a guest writes ``ready NAME PID`` on that descriptor once its
sockets accept connections; a fleet parent writes ``ready COUNT`` when all of its guests have,
or ``failed REASON`` when one exited first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from daemon.simguest.guest import GuestOSFactory, SimGuest, SimGuestSpec

_PR_SET_PDEATHSIG = 1
Handler = Callable[[int, FrameType | None], Any] | int | None


def default_guest_os() -> GuestOSFactory:
    """The guest OS backed by the allocator model (imported late: it is the heavy part)."""
    from daemon.simguest.guestos import ModelGuestOS

    return ModelGuestOS


async def serve_guest(
    spec: SimGuestSpec, guest_os: GuestOSFactory | None, ready_fd: int | None = None
) -> int:
    guest = SimGuest(spec, guest_os)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, guest.shutdown)
    try:
        await guest.start()
        if ready_fd is not None:
            _write_line(ready_fd, f"ready {spec.name} {os.getpid()}")
        await guest.wait_exit()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await guest.close()
    return 0


def run_guest(
    spec: SimGuestSpec, guest_os: GuestOSFactory | None, ready_fd: int | None = None
) -> int:
    """Run one guest in this process until it exits; returns the exit code."""
    return asyncio.run(serve_guest(spec, guest_os, ready_fd))


def run_fleet(
    specs: Sequence[SimGuestSpec], guest_os: GuestOSFactory | None, ready_fd: int | None = None
) -> int:
    """Fork one child process per guest; return when all have exited (0 if all exited 0)."""
    _warm_up(specs, guest_os)
    # Objects created before the fork are never collected again, so the children do not touch
    # (and so copy) the parent's pages just to scan them.
    gc.collect()
    gc.freeze()
    ready_r, ready_w = os.pipe()
    children: dict[int, str] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for spec in specs:
            if stopping:
                break
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                if ready_fd is not None:
                    os.close(ready_fd)  # only the parent reports for the fleet
                os._exit(_child(spec, guest_os, ready_w, old))
            children[pid] = spec.name
        os.close(ready_w)
        ok = _await_ready(ready_r, len(children))
        if ready_fd is not None:
            _write_line(ready_fd, f"ready {len(children)}" if ok else "failed: a guest exited")
        if not ok:
            forward(signal.SIGTERM, None)
        return _reap(children)
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def _warm_up(specs: Sequence[SimGuestSpec], guest_os: GuestOSFactory | None) -> None:
    """Run a small guest of each workload briefly before forking.

    Modules imported on first use and first-use caches then sit in pages every child shares,
    instead of each child building its own copy.
    """
    with tempfile.TemporaryDirectory(prefix="simguest-warm-") as tmp:
        for workload in sorted({s.workload for s in specs}):
            spec = SimGuestSpec(
                name="warm-up", ram_bytes=4 << 20, socket=Path(tmp) / "w.qmp", workload=workload
            )
            asyncio.run(_brief(spec, guest_os))


async def _brief(spec: SimGuestSpec, guest_os: GuestOSFactory | None) -> None:
    guest = SimGuest(spec, guest_os)
    await guest.start()
    guest.step()
    guest.truth()
    await guest.close()


def _child(
    spec: SimGuestSpec,
    guest_os: GuestOSFactory | None,
    ready_w: int,
    handlers: dict[signal.Signals, Handler],
) -> int:
    try:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() == 1:
            return 1  # the parent died before the death signal was armed
        return run_guest(spec, guest_os, ready_w)
    except BaseException as exc:  # a child must never return into the parent's code
        print(f"simguest {spec.name}: {exc!r}", file=sys.stderr)
        return 1


def _await_ready(fd: int, count: int) -> bool:
    seen = 0
    with os.fdopen(fd, "rb") as pipe:
        for line in pipe:
            if line.startswith(b"ready "):
                seen += 1
                if seen == count:
                    return True
    return seen == count


def _reap(children: dict[int, str]) -> int:
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if children.pop(pid, None) is not None:
            worst = max(worst, abs(os.waitstatus_to_exitcode(status)))
    return worst


def _write_line(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, text.encode() + b"\n")
        os.close(fd)
