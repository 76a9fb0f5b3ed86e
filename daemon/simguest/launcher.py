"""Start simulated guests as child processes and always end them (tests, demo, benchmarks).

``GuestProcess.start(spec)`` runs ``python -m daemon.simguest run ...``; ``FleetProcess.start``
runs ``python -m daemon.simguest fleet ...``. Both return once every guest's sockets accept
connections, raise ``LaunchError`` with the child's output when that does not happen, and
``stop()`` sends SIGTERM (QEMU's ``host-signal`` shutdown), then SIGKILL after a timeout.
Children die with the thread that started them (``PR_SET_PDEATHSIG``): start them from a
thread that lives as long as they should.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.truth import read_truth, truth_path

_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A simulated guest (or fleet) did not come up; the message carries its output."""


def spec_argv(spec: SimGuestSpec, *, guest_os: bool = True) -> list[str]:
    """The ``run`` command line that starts ``spec``."""
    argv = ["run", "--name", spec.name, "--ram", str(spec.ram_bytes)]
    if spec.socket is not None:
        argv += ["--socket", str(spec.socket)]
    if spec.connect is not None:
        argv += ["--connect", str(spec.connect), "--reconnect", str(spec.reconnect)]
    argv += ["--workload", spec.workload, "--seed", str(spec.seed), "--engine", spec.engine]
    argv += ["--time-scale", str(spec.time_scale), "--tick", str(spec.tick)]
    if spec.uuid:
        argv += ["--uuid", spec.uuid]
    if spec.start_paused:
        argv.append("-S")
    if not spec.free_page_reporting:
        argv.append("--no-free-page-reporting")
    if spec.deflate_on_oom:
        argv.append("--deflate-on-oom")
    if spec.page_reporting_order is not None:
        argv += ["--page-reporting-order", str(spec.page_reporting_order)]
    if not spec.agent:
        argv.append("--no-agent")
    if spec.agent_block_rpcs:
        argv += ["--agent-block-rpcs", ",".join(spec.agent_block_rpcs)]
    if not guest_os:
        argv.append("--no-guest-os")
    return argv


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class _Child:
    """A ``python -m daemon.simguest`` process and its readiness pipe."""

    def __init__(self, argv: Sequence[str], log: Path | None, what: str) -> None:
        self.what = what
        self.log = log
        ready_r, ready_w = os.pipe()
        out: IO[Any] | int = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon.simguest", *argv, "--ready-fd", str(ready_w)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(ready_w,),
                preexec_fn=_die_with_parent,
                start_new_session=False,
            )
        finally:
            os.close(ready_w)
            if not isinstance(out, int):
                out.close()
        self._ready = ready_r

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        data = b""
        try:
            while b"\n" not in data:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LaunchError(f"{self.what}: not ready after {timeout:g} s{self._tail()}")
                readable, _, _ = select.select([self._ready], [], [], left)
                if readable:
                    chunk = os.read(self._ready, 4096)
                    if not chunk:
                        break
                    data += chunk
        finally:
            os.close(self._ready)
        line = data.decode(errors="replace").strip()
        if not line.startswith("ready"):
            self.stop(2.0)
            raise LaunchError(f"{self.what}: {line or 'exited before ready'}{self._tail()}")
        return line

    def stop(self, timeout: float) -> int:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def _tail(self) -> str:
        if self.log is None:
            return ""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- output ---\n" + "\n".join(text.splitlines()[-20:])


class GuestProcess:
    """One simulated guest in its own process."""

    def __init__(self, spec: SimGuestSpec, child: _Child) -> None:
        self.spec = spec
        self._child = child

    @classmethod
    def start(
        cls,
        spec: SimGuestSpec,
        *,
        log: Path | None = None,
        timeout: float = 30.0,
        guest_os: bool = True,
    ) -> GuestProcess:
        child = _Child(spec_argv(spec, guest_os=guest_os), log, f"simulated guest {spec.name}")
        guest = cls(spec, child)
        try:
            child.wait_ready(timeout)
        except BaseException:
            guest.stop()
            raise
        return guest

    @property
    def pid(self) -> int:
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        return self._child.process.poll()

    def truth(self) -> dict[str, Any]:
        if self.spec.socket is None:
            raise ValueError(f"{self.spec.name} has no QMP socket, hence no truth socket")
        return read_truth(truth_path(self.spec.socket))

    def stop(self, timeout: float = 5.0) -> int:
        return self._child.stop(timeout)

    def kill(self) -> int:
        """SIGKILL, as a QEMU that crashes or is killed: no SHUTDOWN, its socket file stays."""
        with contextlib.suppress(ProcessLookupError):
            self._child.process.kill()
        return self._child.process.wait()

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()


class FleetProcess:
    """Many simulated guests: one parent that forks a process per guest."""

    def __init__(self, child: _Child, sockets: list[Path]) -> None:
        self._child = child
        self.sockets = sockets

    @classmethod
    def start(
        cls,
        *,
        count: int,
        directory: Path,
        ram_bytes: int,
        workloads: Sequence[str] = ("idle",),
        prefix: str = "sim",
        seed: int = 0,
        tick: float = 0.1,
        time_scale: float = 1.0,
        log: Path | None = None,
        timeout: float = 300.0,
        guest_os: bool = True,
        sched_idle: bool = False,
    ) -> FleetProcess:
        argv = ["fleet", "--count", str(count), "--dir", str(directory), "--prefix", prefix]
        argv += ["--ram", str(ram_bytes), "--workloads", ",".join(workloads)]
        argv += ["--seed", str(seed), "--tick", str(tick), "--time-scale", str(time_scale)]
        if not guest_os:
            argv.append("--no-guest-os")
        if sched_idle:
            argv.append("--sched-idle")
        child = _Child(argv, log, f"fleet of {count}")
        width = max(3, len(str(count - 1)))
        fleet = cls(child, [directory / f"{prefix}{i:0{width}d}.qmp" for i in range(count)])
        try:
            child.wait_ready(timeout)
        except BaseException:
            fleet.stop()
            raise
        return fleet

    @property
    def pid(self) -> int:
        return self._child.pid

    def truth(self, index: int) -> dict[str, Any]:
        return read_truth(truth_path(self.sockets[index]))

    def stop(self, timeout: float = 30.0) -> int:
        return self._child.stop(timeout)

    def __enter__(self) -> FleetProcess:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()
