from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.journal import Journal
from tests.qmp.fake_qmp import Behaviour, FakeQMPServer, FakeVM


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="rd-") as d:
        yield Path(d)


@pytest.fixture
def settings(sockdir: Path) -> Settings:
    return Settings(
        journal=sockdir / "journal.sqlite3",
        poll_interval=0.2,
        command_timeout=1.0,
        connect_timeout=1.0,
        backoff_initial=0.05,
        backoff_max=0.2,
    )


@pytest.fixture
def journal(settings: Settings) -> Iterator[Journal]:
    j = Journal(settings.journal)
    yield j
    j.close()


@pytest.fixture
async def fake_qmp(sockdir: Path) -> AsyncIterator[Callable[..., object]]:
    servers: list[FakeQMPServer] = []

    async def start(
        name: str = "vm1", vm: FakeVM | None = None, behaviour: Behaviour | None = None
    ) -> FakeQMPServer:
        server = FakeQMPServer(
            sockdir / f"{name}.qmp", vm or FakeVM(name=name), behaviour or Behaviour()
        )
        servers.append(await server.start())
        return server

    yield start
    for server in servers:
        await server.stop()
