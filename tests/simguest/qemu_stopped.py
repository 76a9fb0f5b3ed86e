"""Real QEMU with a stopped guest (``-S``): cheap, no guest runs, full QMP.

``python -m tests.simguest.qemu_stopped`` re-captures the fixture ``fixtures/qemu-7.2.json``:
every conversation in ``conversations.py`` held with the installed QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.simguest.conversations import CONVERSATIONS, FIXTURE, QEMU_ARGS, converse

QEMU = "qemu-system-x86_64"


class QemuMissing(RuntimeError):
    pass


@contextlib.contextmanager
def stopped_qemu(socket_path: Path, timeout: float = 10.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``QEMU -S`` with a QMP server socket at ``socket_path``; always killed on exit."""
    binary = shutil.which(QEMU)
    if binary is None:
        raise QemuMissing(f"{QEMU} not found: install qemu-system-x86 (Debian package)")
    proc = subprocess.Popen(
        [binary, *QEMU_ARGS, "-qmp", f"unix:{socket_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while not socket_path.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"QEMU exited with {proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU did not create {socket_path} within {timeout} s")
            time.sleep(0.02)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


async def capture(socket_path: Path) -> dict[str, object]:
    transcripts: dict[str, object] = {}
    for name, steps in CONVERSATIONS.items():
        transcripts[name] = (await converse(str(socket_path), steps)).to_json()
    return transcripts


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "qmp.sock"
        with stopped_qemu(sock):
            transcripts = asyncio.run(capture(sock))
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    doc = {"qemu": version.stdout.splitlines()[0], "args": QEMU_ARGS, "conversations": transcripts}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {FIXTURE} ({doc['qemu']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
