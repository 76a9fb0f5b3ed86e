"""Fixtures for the guest agent tests: ``fake_agent(behaviour=..., files=...)`` starts a fake
qemu-ga on a Unix socket (fake_agent.py) and stops it after the test; ``transport_to(path)``
makes a ``SocketTransport`` that is closed after the test (a client left connected would leave
qemu.qmp's reader tasks, and their errors, unawaited)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.agent.transport import SocketTransport
from tests.agent.fake_agent import FakeAgent

StartAgent = Callable[..., Awaitable[FakeAgent]]
TransportTo = Callable[..., SocketTransport]


@pytest.fixture
async def fake_agent(sockdir: Path) -> AsyncIterator[StartAgent]:
    agents: list[FakeAgent] = []

    async def start(name: str = "vm1", **fields: Any) -> FakeAgent:
        agent = FakeAgent(sockdir / f"{name}.qga", **fields)
        agents.append(await agent.start())
        return agent

    yield start
    for agent in agents:
        await agent.stop()


@pytest.fixture
async def transport_to() -> AsyncIterator[TransportTo]:
    made: list[SocketTransport] = []

    def make(path: Path, **options: Any) -> SocketTransport:
        made.append(SocketTransport(path, **options))
        return made[-1]

    yield make
    for transport in made:
        await transport.close()
