"""The control channel client against a fake guest on a Unix socket (the transport seam)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.testguest.control import ControlChannel, fields
from daemon.testguest.errors import ControlError

# Given one received command line, the bytes the fake guest writes back (None: hang up).
Responder = Callable[[str], bytes | None]


class FakeGuest:
    """Accepts connections one after another and answers each line with ``respond``."""

    def __init__(self, path: Path, respond: Responder) -> None:
        self.path = path
        self.respond = respond
        self.received: list[str] = []
        self.connections = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            with conn, conn.makefile("rb") as lines:
                for raw in lines:
                    line = raw.decode().rstrip("\n")
                    self.received.append(line)
                    reply = self.respond(line)
                    if reply is None:
                        break
                    conn.sendall(reply)

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def guest_at(short_dir: Path) -> Iterator[Callable[[Responder], FakeGuest]]:
    made: list[FakeGuest] = []

    def make(respond: Responder) -> FakeGuest:
        made.append(FakeGuest(short_dir / "control.sock", respond))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def test_send_returns_the_reply_to_its_command(guest_at: Callable[[Responder], FakeGuest]) -> None:
    fake = guest_at(lambda line: f"OK {line} allocated_mib=200\n".encode())
    channel = ControlChannel(fake.path)
    assert channel.send("alloc   200") == "OK alloc 200 allocated_mib=200"
    assert fake.received == ["alloc 200"]
    channel.close()


def test_lines_that_answer_something_else_are_skipped(
    guest_at: Callable[[Responder], FakeGuest],
) -> None:
    # A reply that came after an earlier timeout, a stray line, then the answer, in one write.
    fake = guest_at(lambda line: b"OK alloc 10 late\nnoise\r\nOK status memfree_kib=1\n")
    assert ControlChannel(fake.path).send("status") == "OK status memfree_kib=1"


def test_an_err_reply_raises_with_the_reply(guest_at: Callable[[Responder], FakeGuest]) -> None:
    fake = guest_at(lambda line: b"ERR alloc 9999 MiB exceeds MemAvailable\n")
    with pytest.raises(ControlError, match="exceeds MemAvailable") as failed:
        ControlChannel(fake.path).send("alloc 9999")
    assert failed.value.reply == "ERR alloc 9999 MiB exceeds MemAvailable"


def test_no_reply_times_out_and_drops_the_connection(
    guest_at: Callable[[Responder], FakeGuest],
) -> None:
    fake = guest_at(lambda line: b"" if line == "alloc 1" else b"OK ping\n")
    channel = ControlChannel(fake.path)
    with pytest.raises(ControlError, match="no reply"):
        channel.send("alloc 1", timeout=0.2)
    assert channel.send("ping") == "OK ping"
    assert fake.connections == 2


def test_a_hang_up_raises(guest_at: Callable[[Responder], FakeGuest]) -> None:
    fake = guest_at(lambda line: None)
    with pytest.raises(ControlError, match="closed"):
        ControlChannel(fake.path).send("status", timeout=5)


def test_connect_fails_clearly_without_a_socket(short_dir: Path) -> None:
    with pytest.raises(ControlError, match="cannot connect"):
        ControlChannel(short_dir / "absent.sock").connect(timeout=0.1)


@pytest.mark.parametrize("command", ["", "   ", "alloc 1\nfree"])
def test_a_command_is_one_line(command: str, short_dir: Path) -> None:
    with pytest.raises(ValueError):
        ControlChannel(short_dir / "unused.sock").send(command)


def test_fields() -> None:
    reply = "OK status memfree_kib=1024 balloon=bound page_reporting_order=9"
    assert fields(reply) == {"memfree_kib": "1024", "balloon": "bound", "page_reporting_order": "9"}
