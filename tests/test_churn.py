"""QEMUs that restart over and over: every SHUTDOWN kept, every VM back, nothing left behind.

The short version of ``bench/bench_churn.py`` (which times 300 restarts of 20 simulated guests):
a few fake QEMUs at the socket seam restart in turns, half of them with a SHUTDOWN and a clean
exit, half killed (no event, the socket file left behind), and come back after a random pause.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from pathlib import Path

from daemon.config import Address, Settings
from daemon.service import Reclaimd
from tests.qmp.fake_qmp import FakeQMPServer, FakeVM
from tests.qmp.test_session import eventually

VMS = 4
CYCLES = 8


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_restarting_qemus_lose_no_shutdown_and_leave_nothing_behind(
    settings: Settings, sockdir: Path
) -> None:
    # The daemon's own defaults for backing off: reconnecting fast is the point.
    settings = settings.model_copy(update={"backoff_initial": 0.5, "backoff_max": 30.0})
    daemon = Reclaimd(settings, host_view=False)
    await daemon.start()
    paths = {f"vm{i}": sockdir / f"vm{i}.qmp" for i in range(VMS)}
    servers = {n: await FakeQMPServer(p, FakeVM(name=n)).start() for n, p in paths.items()}
    for name, path in paths.items():
        daemon.add_vm(name, Address("unix", path=str(path)))
    await eventually(lambda: all(vm.up for vm in daemon.fleet), 10)
    baseline_tasks, baseline_fds = len(asyncio.all_tasks()), _open_fds()
    shutdowns = dict.fromkeys(paths, 0)
    rng = random.Random(7)

    async def churn(name: str) -> None:
        vm = daemon.fleet.get(name)
        assert vm is not None
        for cycle in range(CYCLES):
            server = servers[name]
            await eventually(lambda: vm.up, 10)
            if cycle % 2 == 0:  # SIGTERM: QEMU says SHUTDOWN, exits and removes its socket
                server.emit_and_hang_up([("SHUTDOWN", {"guest": False, "reason": "host-signal"})])
                shutdowns[name] += 1
                await server.stop()
            else:  # kill -9: no word, and the socket file stays behind
                await server.stop()
                path = paths[name]
                with socket.socket(socket.AF_UNIX) as stale:
                    stale.bind(str(path))
            await asyncio.sleep(rng.uniform(0, 0.3))
            servers[name] = await FakeQMPServer(paths[name], FakeVM(name=name)).start()
            reconnects = vm.reconnects
            await eventually(lambda r=reconnects: vm.reconnects > r and vm.up, 10)  # type: ignore[misc]

    try:
        await asyncio.gather(*(churn(name) for name in paths))
        journal = daemon.journal
        assert journal is not None
        await asyncio.to_thread(journal.flush)
        for name, sent in shutdowns.items():
            events = journal.entries(name, kinds=["event"], limit=1000)
            assert [e.name for e in events].count("SHUTDOWN") == sent, name
            vm = daemon.fleet.get(name)
            assert vm is not None and vm.reconnects == CYCLES and vm.events_dropped == 0
        # Nothing grows with restarts: tasks, and descriptors (give the closes a moment).
        await asyncio.sleep(0.5)
        assert len(asyncio.all_tasks()) <= baseline_tasks
        assert _open_fds() <= baseline_fds
    finally:
        await daemon.stop()
        for server in servers.values():
            await server.stop()
