"""The simulated guest's agent: qemu-ga's protocol and the read-only file commands reclaimd uses.

Served next to the QMP socket ``PATH`` on ``PATH.qga``, as QEMU serves a guest agent's
``virtserialport`` chardev: the QMP wire format without a greeting or capability negotiation.
Commands, with qemu-ga 7.2's replies: ``guest-sync``, ``guest-sync-delimited`` (the reply after a
0xFF byte), ``guest-ping``, ``guest-info``, ``guest-file-open`` (mode ``r`` only; the files are
those of ``GuestFiles``), ``guest-file-read``, ``guest-file-close``. Every other command, and
those in ``blocked`` (as ``--block-rpcs``), answers as qemu-ga does for a command it does not
offer. The files are the guest kernel's: ``/proc/buddyinfo`` from the allocator model's free
lists, ``/proc/meminfo`` from its counters and the reporting order's sysfs file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.model import PAGE_SIZE, BuddyAllocator, MemInfo

AGENT_SUFFIX = ".qga"
VERSION = "7.2.0"
COMMANDS = (
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-file-open",
    "guest-file-close",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-exec",
    "guest-exec-status",
    "guest-get-osinfo",
    "guest-shutdown",
)
IMPLEMENTED = frozenset(COMMANDS[:7])
MAX_READ = 48 * 1024 * 1024  # qemu-ga's QGA_READ_COUNT_MAX
REPORTING_ORDER_FILE = "/sys/module/page_reporting/parameters/page_reporting_order"
MAX_LINE = 1 << 16


def agent_path(qmp_socket: Path | str) -> Path:
    return Path(f"{qmp_socket}{AGENT_SUFFIX}")


def buddyinfo(alloc: BuddyAllocator) -> str:
    """``/proc/buddyinfo`` as Linux prints it (``frag_show_print``): free blocks per order."""
    lines = []
    orders = len(alloc.nr_free) // len(alloc.zones)
    for zone in alloc.zones:
        counts = alloc.nr_free[zone.idx * orders : (zone.idx + 1) * orders]
        lines.append(f"Node 0, zone {zone.name:>8} " + "".join(f"{n:6d} " for n in counts))
    return "\n".join(lines) + "\n"


def meminfo(info: MemInfo) -> str:
    """The first lines of ``/proc/meminfo`` (kB), as ``meminfo_proc_show`` prints them."""
    kib = PAGE_SIZE // 1024
    rows = (
        ("MemTotal", info.total_pages),
        ("MemFree", info.free_pages),
        ("MemAvailable", info.available_pages),
        ("Cached", info.file_pages),
    )
    return "".join(f"{name + ':':<16}{pages * kib:>8} kB\n" for name, pages in rows)


class GuestAgent:
    """One guest's agent. ``files(path)`` gives a file's text now, or None if it does not exist."""

    def __init__(
        self, files: Callable[[str], str | None], blocked: frozenset[str] = frozenset()
    ) -> None:
        self.files = files
        self.blocked = blocked
        self._handles: dict[int, tuple[bytes, int]] = {}  # handle -> (content, position)
        self._next_handle = 1000
        self._server: asyncio.Server | None = None
        self._path: Path | None = None

    async def serve(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._conversation, path=str(path))
        self._path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            self._path = None

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        decoder = json.JSONDecoder()
        pending = b""
        try:
            while chunk := await reader.read(65536):
                pending += chunk
                # 0xFF resets the agent's parser (a client resynchronising): what came before
                # it is dropped, as qemu-ga's JSON streamer does.
                pending = pending.rsplit(b"\xff", 1)[-1]
                if len(pending) > MAX_LINE:
                    pending = b""
                buffer = pending.decode(errors="replace")
                while buffer.strip():
                    try:
                        msg, end = decoder.raw_decode(buffer.lstrip())
                    except json.JSONDecodeError:
                        break
                    buffer = buffer.lstrip()[end:]
                    pending = buffer.encode()
                    prefix, reply = self._reply(msg)
                    if isinstance(msg, dict) and "id" in msg:
                        reply["id"] = msg["id"]  # as the QMP dispatcher does
                    writer.write(prefix + json.dumps(reply).encode() + b"\n")
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _reply(self, msg: object) -> tuple[bytes, dict[str, Any]]:
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            return b"", _error("GenericError", "Invalid JSON syntax")
        name, args = msg["execute"], msg.get("arguments") or {}
        if name not in COMMANDS or name in self.blocked:
            if name in self.blocked:
                return b"", _error("CommandNotFound", f"Command {name} has been disabled")
            return b"", _error("CommandNotFound", f"The command {name} has not been found")
        if name not in IMPLEMENTED:
            return b"", _error("GenericError", f"{name} is not available in this guest")
        try:
            result = self._run(name, args)
        except _Failure as exc:
            return b"", _error("GenericError", str(exc))
        prefix = b"\xff" if name == "guest-sync-delimited" else b""
        return prefix, {"return": result}

    def _run(self, name: str, args: dict[str, Any]) -> Any:
        if name in ("guest-sync", "guest-sync-delimited"):
            return args.get("id")
        if name == "guest-ping":
            return {}
        if name == "guest-info":
            return {
                "version": VERSION,
                "supported_commands": [
                    {"name": c, "enabled": c not in self.blocked, "success-response": True}
                    for c in COMMANDS
                ],
            }
        if name == "guest-file-open":
            path, mode = args.get("path"), args.get("mode", "r")
            if mode != "r":
                raise _Failure(f"failed to open file '{path}' (mode: '{mode}'): read-only guest")
            text = self.files(path) if isinstance(path, str) else None
            if text is None:
                raise _Failure(
                    f"failed to open file '{path}' (mode: 'r'): No such file or directory"
                )
            opened, self._next_handle = self._next_handle, self._next_handle + 1
            self._handles[opened] = (text.encode(), 0)
            return opened
        handle = args.get("handle")
        if not isinstance(handle, int) or handle not in self._handles:
            raise _Failure(f"handle '{handle}' has not been found")
        if name == "guest-file-close":
            del self._handles[handle]
            return {}
        content, pos = self._handles[handle]
        count = args.get("count", 4096)
        if type(count) is not int or not 0 <= count <= MAX_READ:
            raise _Failure(f"value '{count}' is invalid for argument count")
        data = content[pos : pos + count]
        self._handles[handle] = (content, pos + len(data))
        return {
            "count": len(data),
            "buf-b64": base64.b64encode(data).decode(),
            "eof": pos + len(data) >= len(content),
        }


class _Failure(Exception):
    pass


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
