"""A VM's guest agent in its poll cycle: every kind of agent trouble is that VM's reason, and
nothing else waits on it (the real agent is in tests/e2e/test_agent.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.config import Settings, VMConfig
from daemon.fleet import VMState
from daemon.service import Reclaimd
from tests.agent.fake_agent import RAM_512M, RHEL_BLOCKED, Behaviour, FakeAgent, buddyinfo_line
from tests.qmp.fake_qmp import FakeQMPServer, FakeVM
from tests.qmp.test_session import eventually

ABSENT = None  # the agent's socket is configured, and is not there
LYING = {"/proc/buddyinfo": buddyinfo_line(0, "DMA32", [0] * 10 + [1 << 20]).encode()}


@contextlib.asynccontextmanager
async def attached(
    settings: Settings, sockdir: Path, behaviour: Behaviour | None, files: dict[str, bytes]
) -> AsyncIterator[VMState]:
    """A fake QEMU with its agent beside its QMP socket (``SOCKET.qga``), and the daemon."""
    qmp = sockdir / "vm1.qmp"
    server = await FakeQMPServer(qmp, FakeVM(name="vm1", ram=RAM_512M, actual=RAM_512M)).start()
    config = VMConfig(name="vm1", address=f"unix:{qmp}")
    agent = None
    if behaviour is ABSENT:
        config = config.model_copy(update={"agent": f"unix:{sockdir / 'nowhere.qga'}"})
    else:
        agent = FakeAgent(Path(f"{qmp}.qga"), behaviour=behaviour)
        agent.files.update(files)
        await agent.start()
    daemon = Reclaimd(settings.model_copy(update={"vm": [config], "poll_interval": 0.5}))
    await daemon.start()
    try:
        vm = daemon.fleet.get("vm1")
        assert vm is not None
        yield vm
    finally:
        await daemon.stop()
        if agent is not None:
            await agent.stop()
        await server.stop()


@pytest.mark.parametrize(
    ("behaviour", "files", "problem", "words"),
    [
        (Behaviour(), {}, None, ""),
        (ABSENT, {}, "absent", "does not exist"),
        (Behaviour(blocked=frozenset(RHEL_BLOCKED)), {}, "blocked", "guest-file"),
        (Behaviour(answer=False), {}, "timeout", ""),
        (Behaviour(), LYING, "rejected", "ram"),
    ],
    ids=["working", "absent", "blocked", "hung", "lying"],
)
async def test_agent_trouble_is_the_vms_reason_and_delays_nothing(
    settings: Settings,
    sockdir: Path,
    behaviour: Behaviour | None,
    files: dict[str, bytes],
    problem: str | None,
    words: str,
) -> None:
    async with attached(settings, sockdir, behaviour, files) as vm:
        await eventually(lambda: vm.agent is not None, 15)
        assert vm.agent is not None
        if problem is None:
            assert vm.agent.ok and vm.agent.reporting_order == 9, vm.agent
        else:
            assert not vm.agent.ok and vm.agent.problem == problem, vm.agent
            assert words in (vm.agent.reason or "").lower(), vm.agent.reason
            assert len(vm.agent.reason or "") <= 240
        # The VM's polls go on at their pace whatever its agent does.
        polls = vm.last_poll
        assert polls is not None
        started = time.monotonic()
        await eventually(lambda: (vm.last_poll or 0) > polls + 1.0, 5)
        assert time.monotonic() - started < 3.0
        assert vm.up and vm.guest_stats is not None
