"""Listen mode: QEMUs connect to reclaimd's socket and are attached with no configuration."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.fleet import SessionState
from daemon.service import Reclaimd
from tests.qmp.fake_qmp import FakeQMPServer, FakeVM
from tests.qmp.test_session import eventually

ZERO_UUID = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
async def daemon(settings: Settings, sockdir: Path) -> AsyncIterator[Reclaimd]:
    listen = sockdir / "listen" / "qmp.sock"
    d = Reclaimd(settings.model_copy(update={"listen_socket": listen}), host_view=False)
    await d.start()
    yield d
    await d.stop()


def qemu(sockdir: Path, **vm: object) -> FakeQMPServer:
    """A QEMU started with ``-chardev socket,path=LISTEN,reconnect=5 -mon ...``."""
    return FakeQMPServer(sockdir / "unused", FakeVM(**vm))  # type: ignore[arg-type]


async def test_a_qemu_that_connects_is_named_by_its_name_and_attached(
    daemon: Reclaimd, sockdir: Path
) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    assert stat.S_IMODE(os.stat(listen).st_mode) == 0o600
    guest = qemu(sockdir, name="web1")
    await guest.connect_to(listen)
    vm = await _attached(daemon, "web1")
    assert vm.attach == "listen" and vm.address == f"listen:{listen}"
    assert vm.qemu_name == "web1" and vm.memory.ram_bytes == guest.vm.ram
    entries = daemon.events("web1", since=None, before_id=None, limit=10)
    assert [e.name for e in entries] == ["attach"]
    await guest.stop()


async def test_a_reconnecting_qemu_keeps_its_record_and_session(
    daemon: Reclaimd, sockdir: Path
) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    guest = qemu(sockdir, name="web1")
    await guest.connect_to(listen)
    vm = await _attached(daemon, "web1")
    session = daemon.sessions["web1"]
    guest.drop_clients()  # QEMU restarts, or its chardev reconnects
    await eventually(lambda: not vm.up)
    assert vm.session_state == SessionState.DISCONNECTED
    await guest.connect_to(listen)
    await eventually(lambda: vm.up and vm.reconnects == 1)
    assert daemon.fleet.get("web1") is vm and daemon.sessions["web1"] is session
    assert list(session.transitions) == [
        SessionState.IDLE,
        SessionState.ATTACHING,
        SessionState.RUNNING,
        SessionState.DISCONNECTED,
        SessionState.ATTACHING,
        SessionState.RUNNING,
    ]
    await guest.stop()


async def test_a_qemu_without_a_name_is_named_by_uuid_and_else_by_pid(
    daemon: Reclaimd, sockdir: Path
) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    by_uuid = qemu(sockdir, name="", uuid="5f1d9f5c-aaaa-4222-8333-444455556666")
    await by_uuid.connect_to(listen)
    await _attached(daemon, "5f1d9f5c-aaaa-4222-8333-444455556666")
    anonymous = qemu(sockdir, name="", uuid=ZERO_UUID)  # QEMU's default UUID names nothing
    await anonymous.connect_to(listen)
    await _attached(daemon, f"pid-{os.getpid()}")
    await by_uuid.stop()
    await anonymous.stop()


async def test_two_live_qemus_with_one_name_are_told_apart_by_uuid(
    daemon: Reclaimd, sockdir: Path
) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    first = qemu(sockdir, name="web", uuid="11111111-0000-4000-8000-000000000001")
    second = qemu(sockdir, name="web", uuid="22222222-0000-4000-8000-000000000002")
    await first.connect_to(listen)
    await _attached(daemon, "web")
    await second.connect_to(listen)
    await _attached(daemon, "web-22222222")
    assert daemon.fleet.get("web") is not None and daemon.fleet.get("web").up  # type: ignore[union-attr]
    await first.stop()
    await second.stop()


async def test_a_peer_that_fails_the_handshake_attaches_nothing(
    daemon: Reclaimd, sockdir: Path
) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    reader, writer = await asyncio.open_unix_connection(str(listen))
    writer.write(b'{"not": "a greeting"}\r\n')
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped
    writer.close()
    guest = qemu(sockdir, name="ok")
    await guest.connect_to(listen)
    await _attached(daemon, "ok")
    assert [vm.name for vm in daemon.fleet] == ["ok"]
    await guest.stop()


async def test_stopping_detaches_listened_vms_and_removes_the_socket(
    settings: Settings, sockdir: Path
) -> None:
    listen = sockdir / "qmp.sock"
    listen.touch()  # a stale file where the socket goes is not replaced...
    with pytest.raises(OSError):
        await Reclaimd(settings.model_copy(update={"listen_socket": listen})).start()
    listen.unlink()
    d = Reclaimd(settings.model_copy(update={"listen_socket": listen}), host_view=False)
    await d.start()
    guest = qemu(sockdir, name="web1")
    await guest.connect_to(listen)
    vm = await _attached(d, "web1")
    journal = d.journal
    assert journal is not None
    await d.stop()
    assert not listen.exists()
    assert vm.session_state == SessionState.STOPPED
    detach = [e for e in _all_entries(settings) if e.name == "detach"]
    assert [e.data["cause"] for e in detach] == ["reclaimd is stopping"]
    await guest.stop()


async def _attached(daemon: Reclaimd, name: str):  # type: ignore[no-untyped-def]
    await eventually(lambda: (vm := daemon.fleet.get(name)) is not None and vm.up)
    return daemon.fleet.get(name)


def _all_entries(settings: Settings):  # type: ignore[no-untyped-def]
    from daemon.journal import Journal

    with Journal(settings.journal) as j:
        return j.entries("web1", limit=100)
