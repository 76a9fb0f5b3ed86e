"""A real QEMU 7.2 started with -S (the guest never runs, so it is cheap), and its QMP replies.

A ``-device loader`` puts a known blob into guest RAM at a known guest-physical address before the
guest starts, so tests know which pages must be resident.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

QEMU = "qemu-system-x86_64"
BLOB_GPA = 0x100_0000  # 16 MiB
BLOB_BYTES = 3 << 20
MEMFD_ARGS = (
    "-object",
    "memory-backend-memfd,id=ram0,size=256M",
    "-machine",
    "memory-backend=ram0",
)


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    qmp_path: str
    ramblock_text: str
    mtree_text: str
    memdevs: list[dict[str, Any]]
    ram_size: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def _query(path: str) -> tuple[str, str, list[dict[str, Any]], int]:
    client = QMPClient("test")
    await asyncio.wait_for(client.connect(path), 10)
    try:
        ramblock = await client.execute("x-query-ramblock")
        mtree = await client.execute("human-monitor-command", {"command-line": "info mtree -f"})
        memdevs = await client.execute("query-memdev")
        summary = await client.execute("query-memory-size-summary")
    finally:
        await client.disconnect()
    assert isinstance(ramblock, dict) and isinstance(mtree, str) and isinstance(memdevs, list)
    assert isinstance(summary, dict)
    return ramblock["human-readable-text"], mtree, memdevs, int(summary["base-memory"])


def start_qemu(workdir: Path, *extra: str, mem: str = "256") -> Qemu:
    """Start QEMU -S with a 3 MiB random blob loaded at 16 MiB; fail clearly without QEMU."""
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is not installed: these tests need the real QEMU (see deploy/)")
    blob = workdir / "blob.bin"
    if not blob.exists():
        blob.write_bytes(os.urandom(BLOB_BYTES))
    qmp_path = str(workdir / f"qmp-{len(list(workdir.iterdir()))}.sock")
    argv = [
        QEMU, "-M", "pc", "-m", mem, "-S", "-display", "none", "-nodefaults",
        "-device", f"loader,file={blob},addr={BLOB_GPA:#x},force-raw=on",
        "-qmp", f"unix:{qmp_path},server=on,wait=off", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not _listening(qmp_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            pytest.fail(f"QEMU did not start its QMP socket: {err.strip()}")
        time.sleep(0.02)
    try:
        texts = asyncio.run(_query(qmp_path))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Qemu(proc, qmp_path, *texts)


def _listening(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True
