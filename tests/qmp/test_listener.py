"""Listen mode: QEMUs connect to reclaimd's socket and are attached with no configuration."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings
from daemon.fleet import SessionState
from daemon.instruments import REGISTRY as DAEMON_REGISTRY
from daemon.service import Reclaimd
from tests.qmp.fake_qmp import Behaviour, FakeQMPServer, FakeVM
from tests.qmp.test_session import eventually

ZERO_UUID = "00000000-0000-0000-0000-000000000000"
REAL_UUID = "5f1d9f5c-1111-4222-8333-444455556666"
NOBODY = NOGROUP = 65534
MiB = 1024 * 1024
PEER = Path(__file__).with_name("qmp_peer.py")


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
    assert stat.S_IMODE(os.stat(listen.parent).st_mode) == 0o700  # made by reclaimd
    guest = qemu(sockdir, name="web1")
    await guest.connect_to(listen)
    vm = await _attached(daemon, "web1")
    assert vm.attach == "listen" and vm.address == f"listen:{listen}"
    assert vm.qemu_name == "web1" and vm.memory.ram_bytes == guest.vm.ram
    entries = await daemon.events("web1", since=None, before_id=None, limit=10)
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


async def test_a_qemu_without_name_or_uuid_is_named_by_a_socket_of_its_own(
    daemon: Reclaimd, sockdir: Path
) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    chardevs = [
        {"label": "rd", "filename": f"unix:{listen}", "frontend-open": True},  # reclaimd's
        {"label": "serial0", "filename": "pty:/dev/pts/3", "frontend-open": True},
        {"label": "qmp", "filename": "unix:/run/qemu/vm7.qmp,server=on", "frontend-open": True},
    ]
    guest = FakeQMPServer(
        sockdir / "unused",
        FakeVM(name="", uuid=ZERO_UUID),
        Behaviour(replies={"query-chardev": chardevs}),
    )
    await guest.connect_to(listen)
    vm = await _attached(daemon, "socket-vm7")  # the same name after QEMU restarts
    assert vm.uuid is None
    await guest.stop()


async def test_a_second_qemu_that_claims_an_attached_vms_name_is_refused(
    daemon: Reclaimd, sockdir: Path
) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    first = qemu(sockdir, name="web", uuid="11111111-0000-4000-8000-000000000001")
    second = qemu(sockdir, name="web", uuid="22222222-0000-4000-8000-000000000002")
    await first.connect_to(listen)
    vm = await _attached(daemon, "web")
    session = daemon.sessions["web"]
    await second.connect_to(listen)
    await eventually(lambda: second.connections == 1 and not second._writers)  # hung up on
    assert [v.name for v in daemon.fleet] == ["web"]
    assert daemon.fleet.get("web") is vm and vm.up and daemon.sessions["web"] is session
    await first.stop()
    await second.stop()


async def test_an_impostor_process_gets_no_session_and_a_journalled_refusal(
    daemon: Reclaimd, sockdir: Path
) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    real = qemu(sockdir, name="web1", uuid=REAL_UUID, ram=1024 * MiB, actual=1024 * MiB)
    await real.connect_to(listen)
    vm = await _attached(daemon, "web1")
    session = daemon.sessions["web1"]
    refused = _refused("identity")
    journal = daemon.journal
    assert journal is not None
    # The same name (and a UUID of its own), then the real VM's UUID under another name.
    impostors = (("web1", "66666666-0000-4000-8000-000000000006"), ("other", REAL_UUID))
    pids = []
    for name, uuid in impostors:
        with _peer(listen, name, uuid) as impostor:
            assert await _line(impostor) == "connected"
            assert await _line(impostor) == "closed"  # refused: hung up at once
            pids.append(impostor.pid)
    assert _refused("identity") == refused + 2
    await asyncio.to_thread(journal.flush)
    # Journalled for the VM claimed, once per interval (a peer retrying in a loop cannot fill
    # its history), and nothing of the impostor's own.
    refusals = [e for e in journal.entries("web1", limit=50) if e.kind == "refused"]
    assert [(e.data["pid"], e.data["name"], e.data["uuid"]) for e in refusals] == [
        (pids[0], *impostors[0])
    ]
    assert journal.entries("other") == [] and daemon.fleet.get("other") is None
    assert [v.name for v in daemon.fleet] == ["web1"]
    assert daemon.fleet.get("web1") is vm and vm.up and vm.pid == os.getpid()
    assert daemon.sessions["web1"] is session
    # Changes still go to the real VM.
    await daemon.set_balloon("web1", 768 * MiB, requester="test")
    assert "balloon" in real.commands
    await real.stop()


async def test_qemus_with_the_all_zero_uuid_are_not_one_vm(daemon: Reclaimd, sockdir: Path) -> None:
    listen = daemon.settings.listen_socket
    assert listen is not None
    guests = [qemu(sockdir, name=f"zero{i}", uuid=ZERO_UUID) for i in range(2)]
    for guest in guests:
        await guest.connect_to(listen)
    await _attached(daemon, "zero0")
    await _attached(daemon, "zero1")
    for guest in guests:
        await guest.stop()


async def test_a_peer_whose_uid_is_not_allowed_gets_nothing(
    settings: Settings, sockdir: Path
) -> None:
    _require_root()
    listen = sockdir / "listen" / "qmp.sock"
    d = Reclaimd(settings.model_copy(update={"listen_socket": listen}), host_view=False)
    await d.start()
    try:
        # As if an operator had opened it to everyone: the uid check still refuses.
        os.chmod(sockdir, 0o755)
        os.chmod(listen.parent, 0o755)
        os.chmod(listen, 0o666)
        refused = _refused("peer_uid")
        with _peer(listen, "intruder", user=NOBODY, group=12345) as intruder:
            assert await _line(intruder) == "connected"
            assert await _line(intruder) == "closed"
        assert _refused("peer_uid") == refused + 1
        assert len(d.fleet) == 0
    finally:
        await d.stop()


async def test_members_of_the_configured_group_may_connect(
    settings: Settings, sockdir: Path
) -> None:
    _require_root()
    group = grp.getgrgid(NOGROUP)
    listen = sockdir / "listen" / "qmp.sock"
    update = {"listen_socket": listen, "listen_socket_group": group.gr_name}
    d = Reclaimd(settings.model_copy(update=update), host_view=False)
    await d.start()
    try:
        os.chmod(sockdir, 0o755)  # the test's own directory: let the peer reach ours
        for path, mode in ((listen.parent, 0o710), (listen, 0o660)):
            st = os.stat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, NOGROUP), path
        # A member by a supplementary group only, as QEMU run by libvirt is in "kvm".
        with _peer(listen, "member", user=NOBODY, group=12345, extra_groups=[NOGROUP]) as peer:
            assert await _line(peer) == "connected"
            vm = await _attached(d, "member")
            assert vm.pid == peer.pid
    finally:
        await d.stop()


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


@contextlib.contextmanager
def _peer(
    listen: Path, name: str, uuid: str = ZERO_UUID, **user: Any
) -> Iterator[subprocess.Popen[str]]:
    """A QEMU-like peer process (tests/qmp/qmp_peer.py) that connects to ``listen`` once."""
    # The peer uses the standard library only: another user may not read this interpreter.
    python = "/usr/bin/python3" if user else sys.executable
    argv = [python, str(PEER), "--connect", str(listen), "--name", name, "--uuid", uuid]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **user)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


async def _line(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    return line.strip()


def _refused(reason: str) -> float:
    value = DAEMON_REGISTRY.get_sample_value("reclaimd_listen_refused_total", {"reason": reason})
    return value or 0.0


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs a peer process as another user: it needs root")
