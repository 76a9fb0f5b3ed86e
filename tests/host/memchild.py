"""A child process that holds memory mappings and changes their residency on command.

Run as a script (stdlib only) by ``MemChild``; it reads one JSON command per line on stdin and
answers one JSON line. It is the "QEMU" of the scanner and ledger tests: its mappings are real,
and it discards memory the way QEMU does (MADV_DONTNEED; for fd-backed memory fallocate
PUNCH_HOLE as well).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
from types import TracebackType
from typing import Any

PAGE = 4096
MAP_NORESERVE = 0x4000
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
Ranges = list[tuple[int, int]]  # page ranges [start, end)


def _serve() -> None:  # runs in the child
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    maps: dict[str, tuple[mmap.mmap, int | None]] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op, name = cmd["op"], cmd.get("name")
        reply: dict[str, Any] = {"ok": True}
        if op == "map":
            fd = None
            if cmd["kind"] == "memfd":
                fd = os.memfd_create(cmd.get("memfd_name", "memory-backend-memfd"))
                os.ftruncate(fd, cmd["size"])
                m = mmap.mmap(fd, cmd["size"], flags=mmap.MAP_SHARED)
            else:
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
                m = mmap.mmap(-1, cmd["size"], flags=flags)
            m.madvise(mmap.MADV_NOHUGEPAGE)  # page-exact truth: no 2 MiB THP faults
            maps[name] = (m, fd)
            reply.update(addr=ctypes.addressof(ctypes.c_char.from_buffer(m)), fd=fd)
        elif op == "touch":
            m, _ = maps[name]
            for s, e in cmd["ranges"]:
                for p in range(s, e):
                    m[p * PAGE] = 1
        elif op in ("dontneed", "punch"):
            m, fd = maps[name]
            for s, e in cmd["ranges"]:
                if op == "punch" and fd is not None:
                    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                    if libc.fallocate(fd, mode, s * PAGE, (e - s) * PAGE) != 0:
                        raise OSError(ctypes.get_errno(), "fallocate")
                m.madvise(mmap.MADV_DONTNEED, s * PAGE, (e - s) * PAGE)
        elif op == "unmap":
            m, fd = maps.pop(name)
            m.close()
            if fd is not None:
                os.close(fd)
        elif op == "exit":
            break
        print(json.dumps(reply), flush=True)


class MemChild:
    """Parent-side handle: start the child, send commands, stop it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"memory child exited ({self.proc.wait()}) on {cmd['op']}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def map(
        self, name: str, kind: str, size: int, memfd_name: str | None = None
    ) -> tuple[int, int | None]:
        extra = {"memfd_name": memfd_name} if memfd_name else {}
        r = self._call(op="map", name=name, kind=kind, size=size, **extra)
        return int(r["addr"]), r["fd"]

    def touch(self, name: str, ranges: Ranges) -> None:
        self._call(op="touch", name=name, ranges=ranges)

    def dontneed(self, name: str, ranges: Ranges) -> None:
        self._call(op="dontneed", name=name, ranges=ranges)

    def punch(self, name: str, ranges: Ranges) -> None:
        self._call(op="punch", name=name, ranges=ranges)

    def unmap(self, name: str) -> None:
        self._call(op="unmap", name=name)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()

    def __enter__(self) -> MemChild:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


if __name__ == "__main__":
    _serve()
