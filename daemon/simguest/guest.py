"""One simulated guest at run time: the QMP machine, its monitor sockets and the guest OS.

``SimGuest(spec).start()`` builds the machine, opens the QMP socket (and/or connects out to a
listening reclaimd), serves the truth channel and, once the machine runs, boots the guest OS
and steps it every ``spec.tick`` seconds of virtual time: workload, free page reporting,
the balloon driver and the statistics QEMU asks for. ``wait_exit()`` returns when QEMU would
have exited (``quit``, guest power-off, ``shutdown()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from daemon.guest_stats import GuestStats
from daemon.guestspec import GuestSpec, MiB
from daemon.simguest.agent import GuestAgent, agent_path
from daemon.simguest.commands import MachineCommands
from daemon.simguest.events import EventBus
from daemon.simguest.machine import Machine, MachineConfig
from daemon.simguest.monitor import Monitor
from daemon.simguest.ram import GuestRAM
from daemon.simguest.transport import UnixListener, connect_unix, listen_unix
from daemon.simguest.truth import PageStates, document, serve_truth, truth_path


class GuestOS(Protocol):
    """The guest kernel as the host sees it (implemented by ``daemon.simguest.guestos``)."""

    reporting_order: int

    def advance(self, seconds: float) -> None:
        """Run the guest for ``seconds`` of its time; pages it writes or reports reach ``ram``."""

    def balloon_toward(self, target_pages: int, max_pages: int) -> int:
        """Inflate or deflate by at most ``max_pages`` toward ``target_pages``; returns the
        balloon's size in pages (what the driver writes to ``actual``)."""

    def stats(self) -> GuestStats:
        """The statistics the balloon driver pushes."""

    def page_states(self) -> PageStates: ...

    def proc_file(self, path: str) -> str | None:
        """A guest file as its agent reads it (``/proc/buddyinfo``, ...); None: no such file."""


GuestOSFactory = Callable[["SimGuestSpec", GuestRAM], GuestOS]


@dataclass(frozen=True, kw_only=True)
class SimGuestSpec(GuestSpec):
    """A simulated guest: the guest (``GuestSpec``) and how the simulation runs it.

    ``socket`` is the QMP server socket (``-qmp unix:PATH,server=on,wait=off``); ``connect``
    with ``reconnect`` makes it also connect out to a listening manager, as
    ``-chardev socket,path=...,reconnect=N``. ``workload`` names a model workload (default
    idle). ``time_scale`` runs the guest's own clock faster than the host's (reporting delays,
    workload phases), to shorten demos and tests.
    """

    workload: str = "idle"  # a model workload (daemon.model.WORKLOADS)
    socket: Path | None = None
    connect: Path | None = None
    reconnect: float = 5.0
    seed: int = 0
    engine: str = "upstream"
    start_paused: bool = False
    time_scale: float = 1.0
    tick: float = 0.1
    # The Linux driver moves 256 pages per round trip; a busy host manages a few hundred MiB/s.
    balloon_bytes_per_second: int = 256 * MiB
    # The guest's swap device (None: an eighth of RAM; 0: none, so pressure goes to OOM).
    swap_bytes: int | None = None
    # The guest kernel sends Linux 6.12's counters too (OOM kills, alloc stalls, scans and
    # reclaims); only a QEMU of 9.2 or later passes them on over QMP.
    linux_6_12_stats: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tick <= 0 or self.time_scale <= 0:
            raise ValueError("tick and time_scale must be positive")

    def machine_config(self) -> MachineConfig:
        config = MachineConfig(
            name=self.name,
            ram_bytes=self.ram_bytes,
            free_page_reporting=self.free_page_reporting,
            deflate_on_oom=self.deflate_on_oom,
        )
        return replace(config, uuid=self.uuid) if self.uuid else config


class SimGuest:
    def __init__(self, spec: SimGuestSpec, guest_os: GuestOSFactory | None) -> None:
        """``guest_os=None`` gives a machine whose guest never loads a balloon driver."""
        if spec.socket is None and spec.connect is None:
            raise ValueError("a simulated guest needs a QMP socket, a connect target or both")
        self.spec = spec
        self._factory = guest_os
        self._loop = asyncio.get_running_loop()
        self.events = EventBus(schedule=self._loop.call_later)
        self.machine = Machine(spec.machine_config(), self.events, start_paused=spec.start_paused)
        self.machine.defer = self._loop.call_later
        self.machine.on_start = self._boot
        self.machine.on_reset = self._reboot
        self.machine.on_exit = self._on_exit
        self.monitor = Monitor(MachineCommands(self.machine), spec.machine_config().version, "")
        self.events.sinks.append(self.monitor.event)
        self.ram = GuestRAM(spec.ram_bytes)
        self.os: GuestOS | None = None
        self._exited = asyncio.Event()
        self._listener: UnixListener | None = None
        self._truth: asyncio.Server | None = None
        self.agent = GuestAgent(self._guest_file, frozenset(spec.agent_block_rpcs))
        self._tasks: list[asyncio.Task[None]] = []
        self._last_step = 0.0

    def _on_exit(self) -> None:
        # Later, so the reply to ``quit`` goes out before the sockets close.
        self._loop.call_soon(self._exited.set)

    async def start(self) -> None:
        spec = self.spec
        try:
            if spec.socket is not None:
                self._truth = await serve_truth(truth_path(spec.socket), self.truth)
                if spec.agent:
                    await self.agent.serve(agent_path(spec.socket))
                self._listener = await listen_unix(self.monitor, spec.socket)
            if spec.connect is not None:
                self._tasks.append(
                    asyncio.create_task(connect_unix(self.monitor, spec.connect, spec.reconnect))
                )
        except BaseException:
            await self.close()
            raise
        if self.machine.running:
            self._boot()
        self._tasks.append(asyncio.create_task(self._run()))

    async def wait_exit(self) -> None:
        await self._exited.wait()

    def shutdown(self, reason: str = "host-signal") -> None:
        """Exit as QEMU does on SIGTERM: a SHUTDOWN event, then the sockets close."""
        if self.machine.status == "shutdown":
            self._exited.set()
        else:
            self.machine.shutdown(guest=False, reason=reason)

    async def close(self) -> None:
        """Stop stepping, close every socket (removing their files) and free guest RAM."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.events.close()
        self.monitor.hang_up()
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self.agent.close()
        if self._truth is not None:
            self._truth.close()
            with contextlib.suppress(FileNotFoundError):
                truth_path(self.spec.socket or "").unlink()
            self._truth = None
        self.ram.close()

    def truth(self) -> dict[str, Any]:
        balloon = self.machine.balloon
        pages = self.os.page_states() if self.os is not None else self._no_guest_os()
        return document(
            vm=self.spec.name,
            pages=pages,
            reporting_order=self.os.reporting_order if self.os is not None else -1,
            balloon_target_bytes=balloon.target_bytes,
            balloon_actual_bytes=balloon.actual_bytes,
            virtual_time=self.machine.clock.now(),
            now=time.time(),
        )

    def _guest_file(self, path: str) -> str | None:
        # The agent runs in the guest: before it boots there are no files to read.
        return self.os.proc_file(path) if self.os is not None else None

    def _no_guest_os(self) -> PageStates:
        """Before boot (``-S``) or without a driver: no guest state, only host memory."""
        n = self.ram.npages
        no = np.zeros(n, dtype=bool)
        return PageStates(
            free=no, used=no, ballooned=no, reported=no, cache=no,
            resident=self.ram.backed.copy(), touched=self.ram.touched.copy(), deflated=no,
            free_order=np.full(n, -1, dtype=np.int8),
        )  # fmt: skip

    def _boot(self) -> None:
        if self._factory is None:
            return
        self.os = self._factory(self.spec, self.ram)
        self._last_step = self.machine.clock.now()
        # The driver pushes a first stats buffer when it probes, before any request.
        self.machine.balloon.receive_stats(self.os.stats(), self._last_step)

    def _reboot(self) -> None:
        self.os = None
        self.machine.balloon.guest_set_actual(0)
        if self.machine.running:
            self._boot()

    async def _run(self) -> None:
        while True:
            # Wake early for a stats request: QEMU's timer is precise, and the guest answers
            # at once, so ``last-update`` advances by exactly the polling interval.
            due = self.machine.balloon.next_poll
            delay = self.spec.tick
            if due is not None and self.machine.running:
                delay = min(delay, max(0.0, due - self.machine.clock.now()))
            await asyncio.sleep(delay)
            self.step()

    def step(self) -> None:
        """Advance the guest to the virtual clock's now (nothing happens while paused)."""
        if not self.machine.running:
            return
        now = self.machine.clock.now()
        if self.os is None:
            self.machine.balloon.no_driver(now)
            return
        elapsed, self._last_step = now - self._last_step, now
        self.os.advance(elapsed * self.spec.time_scale)
        balloon = self.machine.balloon
        budget = max(1, int(self.spec.balloon_bytes_per_second * elapsed) >> 12)
        balloon.guest_set_actual(self.os.balloon_toward(balloon.num_pages, budget))
        if balloon.stats_request_due(now):
            balloon.stats_requested()
            balloon.receive_stats(self.os.stats(), now)
