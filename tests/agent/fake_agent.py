"""A guest agent on a Unix socket for tests of the transport seam, misbehaviour included.

It speaks like qemu-ga 7.2 as captured from the real one: no greeting; a 0xFF byte resets its
parser and earns an id-less parse error; ``guest-sync-delimited`` answers behind a 0xFF;
``guest-info`` lists the real 7.2 command set; a command disabled with ``--block-rpcs`` answers
``CommandNotFound`` "Command NAME has been disabled"; file handles start at 1000 and outlive
connections. Its "guest filesystem" is a dict of path -> bytes.

It can be told to misbehave the ways a hung, absent or lying guest does (``Behaviour``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SENTINEL = b"\xff"

# qemu-ga 7.2's commands (Debian 12), from its guest-info.
COMMANDS_7_2 = (
    "guest-exec", "guest-exec-status", "guest-file-close", "guest-file-flush", "guest-file-open",
    "guest-file-read", "guest-file-seek", "guest-file-write", "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list", "guest-fsfreeze-status", "guest-fsfreeze-thaw", "guest-fstrim",
    "guest-get-cpustats", "guest-get-devices", "guest-get-disks", "guest-get-diskstats",
    "guest-get-fsinfo", "guest-get-host-name", "guest-get-memory-block-info",
    "guest-get-memory-blocks", "guest-get-osinfo", "guest-get-time", "guest-get-timezone",
    "guest-get-users", "guest-get-vcpus", "guest-info", "guest-network-get-interfaces",
    "guest-ping", "guest-set-memory-blocks", "guest-set-time", "guest-set-user-password",
    "guest-set-vcpus", "guest-shutdown", "guest-ssh-add-authorized-keys",
    "guest-ssh-get-authorized-keys", "guest-ssh-remove-authorized-keys", "guest-suspend-disk",
    "guest-suspend-hybrid", "guest-suspend-ram", "guest-sync", "guest-sync-delimited",
)  # fmt: skip
RHEL_BLOCKED = ("guest-file-open", "guest-file-read", "guest-file-write", "guest-exec")

SAMPLES = Path(__file__).parent / "samples"
GUEST_6_1 = "linux-6.1-guest"
HOST_6_18 = "linux-6.18-host"
RAM_512M = 512 * 1024 * 1024


def sample(kernel: str, name: str) -> bytes:
    """A file as a real kernel printed it (samples/README.md)."""
    return (SAMPLES / kernel / name).read_bytes()


def text(kernel: str, name: str) -> str:
    return sample(kernel, name).decode()


def buddyinfo_line(node: int, zone: str, counts: list[int] | tuple[int, ...]) -> str:
    """One line of /proc/buddyinfo as mm/vmstat.c frag_show_print prints it:
    "Node %d, zone %8s ", then "%6lu " per order."""
    return f"Node {node}, zone {zone:>8s} " + "".join(f"{c:6d} " for c in counts) + "\n"


def guest_files() -> dict[str, bytes]:
    """The test guest's files (Linux 6.1, 512 MiB) at their guest paths."""
    return {
        "/proc/buddyinfo": sample(GUEST_6_1, "buddyinfo"),
        "/proc/pagetypeinfo": sample(GUEST_6_1, "pagetypeinfo"),
        "/proc/meminfo": sample(GUEST_6_1, "meminfo"),
        "/sys/module/page_reporting/parameters/page_reporting_order": sample(
            GUEST_6_1, "page_reporting_order"
        ),
    }


Reply = dict[str, Any]
Override = Callable[[dict[str, Any]], Reply | bytes | None]


@dataclass
class Behaviour:
    blocked: frozenset[str] = frozenset()  # --block-rpcs
    absent_commands: frozenset[str] = frozenset()  # not built into this agent
    answer: bool = True  # False: read commands and never reply (a hung agent)
    hang_on: str | None = None  # stop answering from this command on
    hangup_on: str | None = None  # close the connection instead of answering this command
    stale_on_connect: bytes = b""  # sent to each new client first (a half-read reply...)
    # Per command: a function of the arguments returning the reply object, raw bytes to send
    # as they are, or None to answer normally.
    override: dict[str, Override] = field(default_factory=dict)
    events_after_reply: int = 0  # event lines sent after every reply
    before_reply: bytes = b""  # sent before every reply except the sync's (stray lines)
    delay: float = 0.0  # seconds before each reply (a slow guest)


@dataclass
class FakeAgent:
    path: Path
    files: dict[str, bytes] = field(default_factory=guest_files)
    behaviour: Behaviour = field(default_factory=Behaviour)
    commands: list[str] = field(default_factory=list)
    open_handles: dict[int, tuple[str, int]] = field(default_factory=dict)  # -> (path, offset)
    connections: int = 0
    parse_errors: int = 0
    _next_handle: int = 1000
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> FakeAgent:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        buffer = b""
        decoder = json.JSONDecoder()
        try:
            if self.behaviour.stale_on_connect:
                writer.write(self.behaviour.stale_on_connect)
            while chunk := await reader.read(65536):
                buffer += chunk
                while buffer:
                    if SENTINEL in buffer:
                        # qemu-ga's lexer: 0xFF ends whatever was half read, with an error.
                        before, buffer = buffer.split(SENTINEL, 1)
                        await self._handle_stream(before, decoder, writer, partial_ok=False)
                        self._send(writer, _error(None, "GenericError", "JSON parse error"))
                        self.parse_errors += 1
                        continue
                    buffer = await self._handle_stream(buffer, decoder, writer, partial_ok=True)
                    break
                await writer.drain()
        except (ConnectionError, _HangUp):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _handle_stream(
        self,
        data: bytes,
        decoder: json.JSONDecoder,
        writer: asyncio.StreamWriter,
        partial_ok: bool,
    ) -> bytes:
        text = data.decode(errors="replace")
        while text.strip():
            text = text.lstrip()
            try:
                obj, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                return text.encode() if partial_ok else b""
            text = text[end:]
            if isinstance(obj, dict):
                await self._command(obj, writer)
        return b""

    def _send(self, writer: asyncio.StreamWriter, reply: Reply | bytes) -> None:
        writer.write(reply if isinstance(reply, bytes) else json.dumps(reply).encode() + b"\n")

    async def _command(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        name = str(msg.get("execute"))
        args = msg.get("arguments") or {}
        self.commands.append(name)
        b = self.behaviour
        if name == b.hang_on:
            b.answer = False
        if name == b.hangup_on:
            raise _HangUp
        if not b.answer:
            return
        if b.delay:
            await asyncio.sleep(b.delay)
        override = b.override.get(name)
        reply = override(args) if override else None
        if reply is None:
            reply = self._answer(name, args)
        if isinstance(reply, dict) and "id" in msg:
            reply["id"] = msg["id"]
        if name == "guest-sync-delimited" and isinstance(reply, dict):
            writer.write(SENTINEL)
        else:
            writer.write(b.before_reply)
        self._send(writer, reply)
        for _ in range(b.events_after_reply):
            self._send(writer, {"event": "SPAM", "timestamp": {"seconds": 0, "microseconds": 0}})

    def _answer(self, name: str, args: dict[str, Any]) -> Reply:
        b = self.behaviour
        if name in b.absent_commands or name not in COMMANDS_7_2:
            return _error(None, "CommandNotFound", f"The command {name} has not been found")
        if name in b.blocked:
            return _error(None, "CommandNotFound", f"Command {name} has been disabled")
        if name in ("guest-sync-delimited", "guest-sync"):
            return {"return": args.get("id")}
        if name == "guest-ping":
            return {"return": {}}
        if name == "guest-info":
            offered = [c for c in COMMANDS_7_2 if c not in b.absent_commands]
            commands = [
                {"enabled": c not in b.blocked, "name": c, "success-response": True}
                for c in offered
            ]
            return {"return": {"version": "7.2.22", "supported_commands": commands}}
        if name == "guest-file-open":
            return self._open(args)
        if name == "guest-file-read":
            return self._read(args)
        if name == "guest-file-close":
            handle = args.get("handle")
            if self.open_handles.pop(handle, None) is None:  # type: ignore[arg-type]
                return _error(None, "GenericError", f"handle '{handle}' has not been found")
            return {"return": {}}
        return _error(None, "GenericError", f"{name} is not emulated")

    def _open(self, args: dict[str, Any]) -> Reply:
        path, mode = args.get("path"), args.get("mode", "r")
        if mode != "r":
            return _error(None, "GenericError", "the fake agent only opens files for reading")
        if path not in self.files:
            return _error(
                None,
                "GenericError",
                f"failed to open file '{path}' (mode: 'r'): No such file or directory",
            )
        handle = self._next_handle
        self._next_handle += 1
        self.open_handles[handle] = (str(path), 0)
        return {"return": handle}

    def _read(self, args: dict[str, Any]) -> Reply:
        handle, count = args.get("handle"), args.get("count", 4096)
        if handle not in self.open_handles:
            return _error(None, "GenericError", f"handle '{handle}' has not been found")
        path, offset = self.open_handles[handle]
        data = self.files[path][offset : offset + count]
        self.open_handles[handle] = (path, offset + len(data))
        eof = len(data) < count  # feof() after fread(), as qemu-ga reports it
        return {
            "return": {
                "count": len(data),
                "buf-b64": base64.b64encode(data).decode(),
                "eof": eof,
            }
        }


class _HangUp(Exception):
    pass


def _error(id_: object, error_class: str, desc: str) -> Reply:
    reply: Reply = {"error": {"class": error_class, "desc": desc}}
    if id_ is not None:
        reply["id"] = id_
    return reply
