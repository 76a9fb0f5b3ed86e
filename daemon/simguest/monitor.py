"""A QMP monitor: greeting, capabilities negotiation, request checks, dispatch and events.

This is the part of QEMU's ``monitor/qmp.c`` and ``qapi/qmp-dispatch.c`` a client can observe.
A monitor serves one client at a time, like a QEMU chardev; events reach the client only after
negotiation, as in QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

from daemon.simguest import schema
from daemon.simguest.wire import (
    JsonStream,
    ParseError,
    QMPError,
    command_not_found,
    encode,
    error_reply,
    generic,
    return_reply,
)

READ_CHUNK = 65536
_NEGOTIATION_PARAMS = (schema.Param("enable", "capabilities", required=False),)


class Commands(Protocol):
    """The command set behind a monitor (see ``daemon.simguest.commands``)."""

    def knows(self, name: str) -> bool: ...

    def execute(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run a command; raise QMPError with QEMU's class and message on failure."""
        ...


def greeting(version: tuple[int, int, int], package: str) -> dict[str, Any]:
    major, minor, micro = version
    return {
        "QMP": {
            "version": {
                "qemu": {"micro": micro, "minor": minor, "major": major},
                "package": package,
            },
            "capabilities": ["oob"],
        }
    }


class Session:
    """One client's conversation with the monitor."""

    def __init__(self, commands: Commands, write: Callable[[bytes], None]) -> None:
        self._commands = commands
        self._write = write
        self.negotiated = False
        self.oob = False

    def send(self, message: dict[str, Any]) -> None:
        self._write(encode(message))

    def event(self, message: dict[str, Any]) -> None:
        if self.negotiated:
            self.send(message)

    def handle(self, value: Any) -> dict[str, Any]:
        """The reply to one JSON value read from the client."""
        if isinstance(value, ParseError):
            return error_reply(generic(value.desc))
        if not isinstance(value, dict):
            return error_reply(generic("QMP input must be a JSON object"))
        has_id = "id" in value
        request_id = value.get("id")
        try:
            return return_reply(self._dispatch(value), request_id, has_id=has_id)
        except QMPError as exc:
            return error_reply(exc, request_id, has_id=has_id)

    def _dispatch(self, request: dict[str, Any]) -> Any:
        name, oob = self._check_request(request)
        arguments: dict[str, Any] = request.get("arguments", {})
        if not self.negotiated:
            if name != "qmp_capabilities":
                raise QMPError(
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            args = schema.check(arguments, _NEGOTIATION_PARAMS)
            self.oob = "oob" in args.get("enable", [])
            self.negotiated = True
            return {}
        if name == "qmp_capabilities":
            raise QMPError(
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
            )
        if not self._commands.knows(name):
            raise command_not_found(name)
        if oob:
            # No command reclaimd uses may run out of band; QEMU says so for each of them.
            raise generic(f"The command {name} does not support OOB")
        return self._commands.execute(name, arguments)

    def _check_request(self, request: dict[str, Any]) -> tuple[str, bool]:
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and self.oob):
                if not isinstance(value, str):
                    raise generic(f"QMP input member '{key}' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise generic("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise generic(f"QMP input member '{key}' is unexpected")
        execute, exec_oob = request.get("execute"), request.get("exec-oob")
        if execute is None and exec_oob is None:
            raise generic("QMP input lacks member 'execute'")
        if execute is not None and exec_oob is not None:
            raise generic("QMP input must not contain both 'execute' and 'exec-oob'")
        return str(execute if execute is not None else exec_oob), exec_oob is not None


class Monitor:
    """QMP over one stream at a time; ``events`` fan out to the connected client.

    ``serve(reader, writer)`` runs a whole conversation and returns when the client hangs up;
    a second client waits until the first is gone, like a QEMU socket chardev.
    """

    def __init__(self, commands: Commands, version: tuple[int, int, int], package: str) -> None:
        self._commands = commands
        self._greeting = greeting(version, package)
        self._busy = asyncio.Lock()
        self._session: Session | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def connected(self) -> bool:
        return self._session is not None

    def event(self, message: dict[str, Any]) -> None:
        if self._session is not None:
            self._session.event(message)

    def hang_up(self) -> None:
        """Close the current client's connection, as QEMU does when it exits."""
        if self._writer is not None:
            self._writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._busy:
            session = Session(self._commands, writer.write)
            self._session, self._writer = session, writer
            stream = JsonStream()
            try:
                session.send(self._greeting)
                await writer.drain()
                while data := await reader.read(READ_CHUNK):
                    for value in stream.feed(data):
                        session.send(session.handle(value))
                    await writer.drain()
            except (ConnectionError, BrokenPipeError):
                pass  # the client went away; the next one may connect
            finally:
                self._session = self._writer = None
                writer.close()
                with contextlib.suppress(ConnectionError, BrokenPipeError):
                    await writer.wait_closed()
