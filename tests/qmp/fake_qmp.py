"""A small QMP server on a Unix socket for tests of the transport seam, misbehaviour included.

It answers like QEMU 7.2 with a balloon device (replies as captured from QEMU), and can be told
to misbehave the ways real monitors do: never greet, never answer, send malformed JSON, send an
endless line, or hang up in the middle of a command; and the ways a hostile peer would: any
reply or greeting replaced by any value (``Behaviour.replies``, ``Behaviour.greeting``),
including JSON that Python's encoder would not write (``Raw``: lone surrogates, nesting
hundreds deep, NaN), events sent while reclaimd attaches (``Behaviour.events_after``), and
floods of events (``emit_many``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.guest_stats import STATS, GuestStats, format_guest_stats

MiB = 1024 * 1024


@dataclass
class FakeVM:
    name: str = "fake"
    uuid: str = "5f1d9f5c-1111-4222-8333-444455556666"
    ram: int = 512 * MiB
    actual: int = 512 * MiB
    balloon_id: str | None = "balloon0"  # None: the device has no id (peripheral-anon)
    polling_interval: int = 0
    stats_updated: bool = True
    free: int = 300 * MiB
    total: int = 490 * MiB
    available: int = 350 * MiB
    caches: int = 20 * MiB
    stats_time: int = 0  # 0: now
    reporting: bool = True
    running: bool = True


@dataclass(frozen=True)
class Raw:
    """JSON text sent as it is, where a value goes."""

    text: str


@dataclass(frozen=True)
class Fail:
    """An error reply in place of a command's return value."""

    error_class: Any
    desc: Any


def encode(value: Any) -> str:
    """JSON text of ``value``, with ``Raw`` text inserted verbatim (the standard library's
    encoder escapes lone surrogates, as QEMU would not have to, and recurses)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{encode(k)}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Behaviour:
    greet: bool = True
    answer: bool = True  # False: accept commands and never reply (a hung monitor)
    garbage_after: str | None = None  # command after which the server sends malformed JSON
    huge_line_after: str | None = None  # command answered with a 10 MiB line
    hangup_on: str | None = None  # command that makes the server hang up without replying
    balloon_step: int = 0  # bytes per BALLOON_CHANGE event when converging; 0 = at once
    lacks: frozenset[str] = frozenset()  # commands this QEMU does not have (CommandNotFound)
    # command -> what it returns instead (a Fail for an error reply); for qom-get the key may
    # be "qom-get PROPERTY"
    replies: dict[str, Any] = field(default_factory=dict)
    greeting: Any = None  # the greeting's "version" member instead of QEMU 7.2's
    events_after: dict[str, list[Any]] = field(default_factory=dict)  # command -> events sent


@dataclass
class FakeQMPServer:
    """Serves on the Unix socket ``path``, or on a TCP port of 127.0.0.1 when ``tcp``."""

    path: Path
    vm: FakeVM = field(default_factory=FakeVM)
    behaviour: Behaviour = field(default_factory=Behaviour)
    tcp: bool = False
    # Called with each command's name and arguments before it is answered.
    on_command: Callable[[str, dict[str, Any]], None] | None = None
    commands: list[str] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> FakeQMPServer:
        if self.tcp:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        else:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}" if self.tcp else f"unix:{self.path}"

    async def stop(self) -> None:
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def emit_and_hang_up(self, events: list[tuple[str, dict[str, Any] | None]]) -> None:
        """Send ``events`` in one write and hang up at once: what a QEMU that exits says last
        arrives together with the end of the stream."""
        for writer in list(self._writers):
            writer.write(b"".join(json.dumps(_event(n, d)).encode() + b"\r\n" for n, d in events))
            writer.close()

    async def connect_to(self, path: Path) -> None:
        """Connect to a listening manager and serve QMP there, as QEMU does with
        ``-chardev socket,path=PATH,reconnect=N -mon chardev=...,mode=control`` (once: the
        test decides when to connect again)."""
        reader, writer = await asyncio.open_unix_connection(str(path))
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def drop_clients(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        for writer in list(self._writers):
            _send(writer, _event(event, data))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def emit_many(self, events: list[Any]) -> None:
        """Send ``events`` (messages: anything ``encode`` takes) in one write: a flood as it
        arrives from a busy monitor, many messages per read."""
        data = b"".join(encode(e).encode(errors="surrogatepass") + b"\r\n" for e in events)
        for writer in list(self._writers):
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._conversation(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not self.behaviour.greet:
            await reader.read()  # accept and say nothing until the peer gives up
            return
        version = {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "fake"}
        if self.behaviour.greeting is not None:
            version = self.behaviour.greeting
        _send(writer, {"QMP": {"version": version, "capabilities": ["oob"]}})
        await writer.drain()
        async for msg in _messages(reader):
            name = msg.get("execute")
            self.commands.append(name)
            if self.on_command is not None:
                self.on_command(name, msg.get("arguments") or {})
            if name == self.behaviour.hangup_on:
                return
            if not self.behaviour.answer and name != "qmp_capabilities":
                continue
            if name == self.behaviour.huge_line_after:
                writer.write(b'{"return": "' + b"x" * (10 * MiB) + b'"}\r\n')
                await writer.drain()
                continue
            reply = self._hostile_reply(name, msg.get("arguments") or {})
            if reply is None:
                reply = self._reply(name, msg.get("arguments") or {})
            if "id" in msg:
                reply["id"] = msg["id"]
            _send(writer, reply)
            for event in self.behaviour.events_after.get(name, []):
                _send(writer, event)
            if name == self.behaviour.garbage_after:
                writer.write(b'{"return": {]]] not json\r\n')
            await writer.drain()
            if name == "balloon":
                await self._converge(writer, int(msg["arguments"]["value"]))

    async def _converge(self, writer: asyncio.StreamWriter, target: int) -> None:
        step = self.behaviour.balloon_step or abs(target - self.vm.actual) or 1
        while self.vm.actual != target:
            delta = min(step, abs(target - self.vm.actual))
            self.vm.actual += delta if target > self.vm.actual else -delta
            _send(writer, _event("BALLOON_CHANGE", {"actual": self.vm.actual}))
            await writer.drain()

    def _hostile_reply(self, name: str, args: dict[str, Any]) -> dict[str, Any] | None:
        replies = self.behaviour.replies
        key = f"{name} {args.get('property')}" if name in ("qom-get", "qom-set") else name
        if key not in replies and name not in replies:
            return None
        value = replies[key] if key in replies else replies[name]
        if isinstance(value, Fail):
            return {"error": {"class": value.error_class, "desc": value.desc}}
        return {"return": value}

    def _reply(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vm
        balloon_parent = "/machine/peripheral" if vm.balloon_id else "/machine/peripheral-anon"
        balloon_name = vm.balloon_id or "device[0]"
        balloon_path = f"{balloon_parent}/{balloon_name}"
        if name in self.behaviour.lacks:
            return _error("CommandNotFound", f"The command {name} has not been found")
        if name == "qmp_capabilities":
            return {"return": {}}
        if name == "query-name":
            return {"return": {"name": vm.name}}
        if name == "query-uuid":
            return {"return": {"UUID": vm.uuid}}
        if name == "query-status":
            status = "running" if vm.running else "paused"
            return {"return": {"status": status, "singlestep": False, "running": vm.running}}
        if name == "query-memory-size-summary":
            return {"return": {"base-memory": vm.ram, "plugged-memory": 0}}
        if name in ("query-memory-devices", "query-memdev"):
            return {"return": []}
        if name == "x-query-ramblock":
            return {"return": {"human-readable-text": _ramblocks(vm.ram)}}
        if name == "query-balloon":
            return {"return": {"actual": vm.actual}}
        if name == "balloon":
            return {"return": {}}
        if name == "qom-list":
            if args.get("path") == balloon_parent:
                return {
                    "return": [
                        {"name": "type", "type": "string"},
                        {"name": balloon_name, "type": "child<virtio-balloon-pci>"},
                    ]
                }
            return {"return": [{"name": "type", "type": "string"}]}
        if name in ("qom-get", "qom-set") and args.get("path") == balloon_path:
            return self._qom(name, args)
        if name in ("qom-get", "qom-set"):
            return _error("DeviceNotFound", f"Device '{args.get('path')}' not found")
        return _error("CommandNotFound", f"The command {name} has not been found")

    def _qom(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vm
        prop = args.get("property")
        if name == "qom-set" and prop == "guest-stats-polling-interval":
            vm.polling_interval = int(args["value"])
            return {"return": {}}
        if prop == "guest-stats-polling-interval":
            return {"return": vm.polling_interval}
        if prop == "free-page-reporting":
            return {"return": vm.reporting}
        if prop in ("free-page-hint", "deflate-on-oom"):
            return {"return": False}
        if prop == "guest-stats":
            if not vm.stats_updated:
                return {"return": format_guest_stats(GuestStats(), since=(7, 2))}
            stats = GuestStats(
                last_update=vm.stats_time or int(time.time()),
                # A guest kernel without HugeTLB sends no hugetlb counters.
                **{s.field: 0 for s in STATS if s.kind == "counter" and s.unit == "faults"},
                swap_in_bytes=0,
                swap_out_bytes=0,
                free_bytes=vm.free,
                total_bytes=vm.total,
                available_bytes=vm.available,
                disk_caches_bytes=vm.caches,
            )
            return {"return": format_guest_stats(stats, since=(7, 2))}
        return _error("GenericError", f"Property '{prop}' not found")


def _ramblocks(ram: int) -> str:
    """``x-query-ramblock`` as QEMU 7.2 prints it for a pc machine of ``ram`` bytes."""
    rows = [("pc.ram", 0, ram), ("pc.bios", ram, 0x40000)]
    header = ("Block Name", "PSize", "Offset", "Used", "Total")
    lines = [f"{header[0]:>24}    {header[1]}{header[2]:>20}{header[3]:>19}{header[4]:>19}"]
    for name, offset, size in rows:
        lines.append(f"{name:>24}    4 KiB  0x{offset:016x} 0x{size:016x} 0x{size:016x}")
    return "\n".join(lines) + "\n"


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def event(name: Any, data: Any = None, timestamp: Any = None) -> dict[str, Any]:
    """An event message; the timestamp is now unless given (any value, for hostile ones)."""
    msg = _event(name, data)
    if timestamp is not None:
        msg["timestamp"] = timestamp
    return msg


def _event(name: Any, data: Any) -> dict[str, Any]:
    now = time.time()
    msg: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
    }
    if data is not None:
        msg["data"] = data
    return msg


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Parse the stream of JSON objects a QMP client sends (no newline between them needed)."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := await reader.read(65536):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                msg, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buffer = buffer.lstrip()[end:]
            yield msg


def _send(writer: asyncio.StreamWriter, msg: Any) -> None:
    # surrogatepass: a Raw text may hold what UTF-8 cannot (JSON escapes are the usual way).
    writer.write(encode(msg).encode(errors="surrogatepass") + b"\r\n")
