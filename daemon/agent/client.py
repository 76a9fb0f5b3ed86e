"""The guest agent commands reclaimd uses, with every reply checked: ``guest-info`` and a
read-only file read. Nothing here writes to the guest or runs anything in it (no
``guest-file-write``, no ``guest-exec``): a file is opened with mode ``"r"`` and always closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.agent.errors import (
    AgentTimeout,
    AgentUnavailable,
    BadReply,
    CommandFailed,
    ConnectionDropped,
    GuestDataRejected,
    one_line,
)
from daemon.agent.transport import AgentTransport

# What a read needs; guest-info says whether the agent offers each of them.
FILE_COMMANDS = ("guest-file-open", "guest-file-read", "guest-file-close")
# Bytes asked for per guest-file-read: one round trip for every file reclaimd reads (buddyinfo
# is about 100 bytes per zone), and a reply line that stays under the transport's read limit.
READ_CHUNK = 32 * 1024
# qemu-ga 7.2 offers about 50 commands; a list far longer than that is not an honest one.
MAX_COMMANDS = 1024
MAX_NAME = 64
# Handles of reads cut short (timeout, lost connection) waiting to be closed on a later read;
# qemu-ga's handles outlive connections, and each holds an open file in the guest.
MAX_ORPHANS = 16


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What ``guest-info`` said: the agent's version and which commands it has enabled."""

    version: str
    enabled: frozenset[str]
    disabled: frozenset[str]

    def unavailable(self, commands: tuple[str, ...]) -> tuple[str, ...]:
        """The ``commands`` this agent does not have enabled, in the order given."""
        return tuple(c for c in commands if c not in self.enabled)


def parse_info(reply: Any) -> AgentInfo:
    """Check and take apart a ``guest-info`` reply."""
    if not isinstance(reply, dict):
        raise BadReply(f"guest-info: expected an object, got {type(reply).__name__}")
    version = reply.get("version")
    commands = reply.get("supported_commands")
    if not isinstance(version, str) or not isinstance(commands, list):
        raise BadReply("guest-info: no version string or supported_commands list")
    if len(commands) > MAX_COMMANDS:
        raise BadReply(f"guest-info: {len(commands)} commands (more than {MAX_COMMANDS})")
    enabled: set[str] = set()
    disabled: set[str] = set()
    for entry in commands:
        name = entry.get("name") if isinstance(entry, dict) else None
        flag = entry.get("enabled") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
            raise BadReply("guest-info: a command without a sensible name")
        if not isinstance(flag, bool):
            raise BadReply(f"guest-info: {one_line(name)}: 'enabled' is not a boolean")
        (enabled if flag else disabled).add(name)
    return AgentInfo(one_line(version, MAX_NAME), frozenset(enabled), frozenset(disabled))


def _decode_chunk(path: str, reply: Any, asked: int) -> tuple[bytes, bool]:
    if not isinstance(reply, dict):
        raise BadReply(f"guest-file-read {path}: expected an object")
    text, count, eof = reply.get("buf-b64"), reply.get("count"), reply.get("eof")
    if not isinstance(text, str) or type(count) is not int or not isinstance(eof, bool):
        raise BadReply(f"guest-file-read {path}: no buf-b64/count/eof")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadReply(f"guest-file-read {path}: buf-b64 is not base64") from None
    if len(data) != count or count > asked:
        raise BadReply(
            f"guest-file-read {path}: {len(data)} bytes, count says {count}, asked for {asked}"
        )
    return data, eof


def _raise_first(results: list[Any]) -> None:
    """Raise the first error in ``results``, preferring one that says what went wrong over a
    command that only saw the connection dropped under it."""
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if not isinstance(e, ConnectionDropped)), errors[0])


class AgentClient:
    """The commands reclaimd sends to one guest agent, over any ``AgentTransport``.

    ``timeout`` bounds each command (the transport adds its own connect timeout).
    """

    def __init__(self, transport: AgentTransport, *, timeout: float = 2.0) -> None:
        self.transport = transport
        self.timeout = timeout
        self._orphans: list[int] = []

    async def _command(self, name: str, arguments: Mapping[str, object] | None = None) -> Any:
        return await self.transport.command(name, arguments, self.timeout)

    async def info(self) -> AgentInfo:
        """``guest-info``: the version and the enabled commands."""
        return parse_info(await self._command("guest-info"))

    async def read_file(self, path: str, *, limit: int, chunk: int = READ_CHUNK) -> bytes:
        """The whole content of the guest file ``path``, read-only.

        Reads in chunks of at most ``chunk`` bytes and refuses (``GuestDataRejected``) a file
        larger than ``limit`` bytes. The handle is always closed: at once, or on a later read
        when the read was cut short by a timeout or a lost connection.
        """
        (data,) = await self.read_files([(path, limit)], chunk=chunk)
        return data

    async def read_files(
        self, files: Sequence[tuple[str, int]], *, chunk: int = READ_CHUNK
    ) -> list[bytes]:
        """The contents of several guest files, ``(path, limit)`` each, read at nearly the same
        moment: all are opened first, then their reads are sent together, so the agent reads
        them back to back (one file's content is as old as the next one's, to within one
        reply). Fails as a whole, with the first file's error; every handle is closed."""
        if not files or chunk < 1 or any(limit < 0 for _, limit in files):
            raise ValueError(f"files={files!r}, chunk={chunk}")
        await self._close_orphans()
        opened = await asyncio.gather(
            *(self._open(path) for path, _ in files), return_exceptions=True
        )
        handles = [h for h in opened if isinstance(h, int)]
        try:
            _raise_first(opened)
            contents = await asyncio.gather(
                *(
                    self._read_all(path, handle, limit, chunk)
                    for (path, limit), handle in zip(files, handles, strict=True)
                ),
                return_exceptions=True,
            )
            _raise_first(contents)
        except (AgentTimeout, AgentUnavailable, asyncio.CancelledError):
            # The connection is gone or out of step: close the handles on the next read.
            for handle in handles:
                self._orphan(handle)
            raise
        except Exception:
            await self._close(handles)
            raise
        await self._close(handles)
        return [c for c in contents if isinstance(c, bytes)]

    async def _open(self, path: str) -> int:
        handle = await self._command("guest-file-open", {"path": path, "mode": "r"})
        if type(handle) is not int or handle < 0:
            raise BadReply(f"guest-file-open {path}: the handle is not a non-negative integer")
        return handle

    async def _read_all(self, path: str, handle: int, limit: int, chunk: int) -> bytes:
        data = bytearray()
        while True:
            # One byte past the limit tells a file of exactly ``limit`` bytes from a larger one.
            asked = min(chunk, limit + 1 - len(data))
            reply = await self._command("guest-file-read", {"handle": handle, "count": asked})
            piece, eof = _decode_chunk(path, reply, asked)
            data += piece
            if len(data) > limit:
                raise GuestDataRejected(f"{path} is larger than {limit} bytes")
            # An empty chunk without eof would otherwise loop for ever.
            if eof or not piece:
                return bytes(data)

    async def _close(self, handles: list[int]) -> None:
        results = await asyncio.gather(
            *(self._command("guest-file-close", {"handle": h}) for h in handles),
            return_exceptions=True,
        )
        for handle, result in zip(handles, results, strict=True):
            if isinstance(result, AgentTimeout | AgentUnavailable):
                self._orphan(handle)
            elif isinstance(result, BaseException) and not isinstance(
                result, CommandFailed | BadReply
            ):
                # Blocked (or cancelled): the agent does not let us close what we opened.
                raise result
            # CommandFailed, BadReply: the agent answered, so the handle is closed or gone.

    def _orphan(self, handle: int) -> None:
        if handle not in self._orphans:
            self._orphans.append(handle)
            del self._orphans[:-MAX_ORPHANS]

    async def _close_orphans(self) -> None:
        while self._orphans:
            handle = self._orphans.pop(0)
            try:
                await self._command("guest-file-close", {"handle": handle})
            except (AgentTimeout, AgentUnavailable):
                self._orphans.insert(0, handle)
                raise
            except CommandFailed:
                pass  # already closed, or the agent restarted: gone either way
