"""Fixtures for the guest agent tests: ``fake_agent(behaviour=..., files=...)`` starts a fake
qemu-ga on a Unix socket (fake_agent.py) and stops it after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agent.fake_agent import FakeAgent

StartAgent = Callable[..., Awaitable[FakeAgent]]


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
