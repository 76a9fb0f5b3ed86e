from __future__ import annotations

import os
import socket

from daemon.host.peercred import peer_pid
from tests.host.qemu import Qemu


def test_socketpair_peer_is_us() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_pid(a) == os.getpid()


def test_qemu_qmp_socket_peer_is_qemu(qemu_default: Qemu) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(qemu_default.qmp_path)
        assert peer_pid(s) == qemu_default.pid


def test_no_pid_over_tcp_or_unconnected() -> None:
    with socket.socket(socket.AF_INET) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            assert peer_pid(client) is None
    with socket.socket(socket.AF_UNIX) as lonely:
        assert peer_pid(lonely) is None
