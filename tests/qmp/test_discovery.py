"""A watched glob of QMP sockets: VMs appear and vanish with their sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from daemon.config import Settings
from daemon.qmp.discovery import SocketWatcher, sockets_matching, vm_name_for, watched_directory
from daemon.service import Reclaimd
from tests.qmp.fake_qmp import FakeQMPServer, FakeVM
from tests.qmp.test_session import eventually


def test_vms_are_named_after_their_sockets() -> None:
    assert vm_name_for(Path("/run/qemu/web1.qmp"), set()) == "web1"
    assert vm_name_for(Path("/run/qemu/web1.sock"), set()) == "web1"
    assert vm_name_for(Path("/run/qemu/101"), set()) == "101"
    assert vm_name_for(Path("/run/qemu/monitor.v2"), set()) == "monitor.v2"
    # The same stem in two directories: the second is told apart by its directory.
    assert vm_name_for(Path("/run/b/web1.qmp"), {"web1"}) == "b-web1"


def bound(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def test_only_sockets_match(sockdir: Path) -> None:
    (sockdir / "plain.qmp").write_text("not a socket")
    with bound(sockdir / "vm1.qmp"), bound(sockdir / "vm2.qmp"):
        assert sockets_matching(str(sockdir / "*.qmp")) == {
            sockdir / "vm1.qmp",
            sockdir / "vm2.qmp",
        }
        assert sockets_matching(str(sockdir / "nothing-*")) == set()


def test_the_watcher_reports_what_appeared_and_what_vanished(sockdir: Path) -> None:
    seen: list[tuple[str, str]] = []
    watcher = SocketWatcher(
        str(sockdir / "*.qmp"),
        appeared=lambda name, path: seen.append(("appeared", name)),
        vanished=lambda name: seen.append(("vanished", name)),
    )
    watcher.scan()
    assert seen == []
    with bound(sockdir / "a.qmp"):
        sock_b = bound(sockdir / "b.qmp")
        watcher.scan()
        watcher.scan()  # nothing new
        assert seen == [("appeared", "a"), ("appeared", "b")]
        sock_b.close()
        (sockdir / "b.qmp").unlink()
        watcher.scan()
        assert seen[2:] == [("vanished", "b")]
        assert watcher.known == {sockdir / "a.qmp": "a"}


async def test_the_daemon_attaches_vms_as_their_sockets_appear_and_forgets_them_after(
    settings: Settings, sockdir: Path
) -> None:
    glob = str(sockdir / "*.qmp")
    daemon = Reclaimd(
        settings.model_copy(update={"socket_glob": glob, "poll_interval": 0.2}), host_view=False
    )
    await daemon.start()
    try:
        web1 = await FakeQMPServer(sockdir / "web1.qmp", FakeVM(name="web1")).start()
        await eventually(lambda: (vm := daemon.fleet.get("web1")) is not None and vm.up)
        db1 = await FakeQMPServer(sockdir / "db1.qmp", FakeVM(name="db1")).start()
        await eventually(lambda: (vm := daemon.fleet.get("db1")) is not None and vm.up)
        await web1.stop()  # the socket file goes with QEMU
        await eventually(lambda: daemon.fleet.get("web1") is None)
        assert [vm.name for vm in daemon.fleet] == ["db1"]
        assert "web1" not in daemon.sessions
        await db1.stop()
    finally:
        await daemon.stop()


def test_the_directory_a_glob_starts_from() -> None:
    assert watched_directory("/run/qemu/*.qmp") == (Path("/run/qemu"), False)
    assert watched_directory("/var/lib/libvirt/qemu/domain-*/monitor.sock") == (
        Path("/var/lib/libvirt/qemu"),
        True,
    )
    assert watched_directory("/run/qemu/web1.qmp") == (Path("/run/qemu"), False)


async def test_a_new_socket_is_seen_at_once_not_at_the_next_look(sockdir: Path) -> None:
    seen: list[str] = []
    watcher = SocketWatcher(
        str(sockdir / "*.qmp"),
        appeared=lambda name, path: seen.append(name),
        vanished=lambda name: None,
        interval=60.0,  # the looks on the interval would find it only in a minute
    )
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(1.0)  # the watch is set up
        with bound(sockdir / "new.qmp"):
            await eventually(lambda: seen == ["new"], 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
