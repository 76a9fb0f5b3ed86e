"""Host side of the guest's control channel: line commands over the second serial port.

QEMU serves the port as a Unix socket (``-chardev socket,server=on,wait=off``). Each command line
gets exactly one reply line, ``OK <verb> key=value ...`` or ``ERR <verb> <reason>``, so a caller
knows when the guest has finished. Lines that do not answer the command in flight (replies that
came after an earlier timeout) are skipped. Protocol: deploy/guest/README.md.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from daemon.testguest.errors import ControlError


def fields(reply: str) -> dict[str, str]:
    """The ``key=value`` words of a reply line."""
    return dict(word.split("=", 1) for word in reply.split() if "=" in word)


class ControlChannel:
    """A blocking client of one guest's control socket. Not thread-safe: one command at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buffer = b""

    def connect(self, timeout: float = 5.0) -> None:
        """Connect (again) to the socket, retrying until QEMU has created it."""
        self.close()
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise ControlError(f"cannot connect to control socket {self.path}") from exc
                time.sleep(0.05)
                continue
            self._sock = sock
            return

    def send(self, command: str, timeout: float = 30.0) -> str:
        """Send one command and return its ``OK ...`` reply line.

        Raises ``ControlError`` on an ``ERR`` reply (kept in ``.reply``), when no reply comes
        within ``timeout`` seconds (the connection is then dropped, so a late reply cannot be
        taken for the next command's), or when the connection closes.
        """
        words = command.split()
        if not words or "\n" in command:
            raise ValueError(f"a control command is one non-empty line: {command!r}")
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        verb = words[0]
        try:
            self._sock.sendall(" ".join(words).encode() + b"\n")
            reply = self._reply_to(verb, time.monotonic() + timeout)
        except ControlError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise ControlError(f"{command!r}: control channel failed: {exc}") from exc
        if reply.startswith("ERR "):
            raise ControlError(f"{command!r}: guest answered {reply!r}", reply)
        return reply

    def _reply_to(self, verb: str, deadline: float) -> str:
        assert self._sock is not None
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                parts = line.split()
                if len(parts) >= 2 and parts[0] in ("OK", "ERR") and parts[1] == verb:
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlError(f"{verb}: no reply from the guest in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                raise ControlError(f"{verb}: no reply from the guest in time") from None
            if not chunk:
                raise ControlError(f"{verb}: control channel closed (QEMU gone?)")
            self._buffer += chunk

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""
