"""``kill -9`` of a real ``reclaimd serve`` in the middle of an event flood.

Every entry the API served is acknowledged (``GET .../events`` shows committed entries only, and
waits for the VM's own), so each one must still be in the journal after the kill; and the next
start records that the dead process never detached its VMs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from daemon.journal import Journal
from daemon.service import RESTARTED_CAUSE
from tests.e2e.reclaimd_proc import ReclaimdProcess
from tests.qmp.fake_qmp import FakeQMPServer, event


async def _start(workdir: Path, servers: dict[str, FakeQMPServer]) -> ReclaimdProcess:
    args: list[str] = []
    for name, server in servers.items():
        args += ["--vm", f"{name}=unix:{server.path}"]
    # The process is started from a thread: the fake QEMUs answer on this loop meanwhile.
    rd = await asyncio.to_thread(ReclaimdProcess, workdir, args)
    await asyncio.to_thread(
        rd.wait_for,
        lambda: all(rd.metric("qemu_vm_up", vm=name) == 1.0 for name in servers),
        30,
        "both VMs up",
    )
    return rd


async def test_kill_9_mid_flood_loses_no_acknowledged_event_and_the_restart_is_marked(
    fake_qmp: Any, tmp_path: Path
) -> None:
    servers = {"flood": await fake_qmp("flood"), "quiet": await fake_qmp("quiet")}
    rd = await _start(tmp_path, servers)
    served: dict[int, tuple[str, dict[str, Any]]] = {}
    try:
        n = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # about 5,000 events a second
            await servers["flood"].emit_many(
                [event("BALLOON_CHANGE", {"actual": n + i}) for i in range(250)]
            )
            n += 250
            page = await asyncio.to_thread(rd.get, "/api/v1/vms/flood/events", limit=1000)
            served.update({e["id"]: (e["name"], e["data"]) for e in page["events"]})
            await asyncio.sleep(0.05)
        rd.process.kill()  # SIGKILL, mid-flood
        await asyncio.to_thread(rd.process.wait, 30)
    finally:
        await asyncio.to_thread(rd.stop)
    assert len(served) > 1000, "the API served too little of the flood to tell anything"
    with Journal(rd.journal) as journal:
        kept = {e.id: (e.name, e.data) for e in journal.entries("flood", limit=10**6)}
        attached = {name: journal.entries(name, kinds=["attach"])[0].id for name in servers}
    lost = {i: entry for i, entry in served.items() if kept.get(i) != entry}
    assert not lost, f"{len(lost)} acknowledged entries lost, e.g. {next(iter(lost.items()))}"

    rd = await _start(tmp_path, servers)
    try:
        for name in servers:
            page = await asyncio.to_thread(rd.get, f"/api/v1/vms/{name}/events", limit=1000)
            sessions = [e for e in page["events"] if e["kind"] in ("attach", "detach")]
            # Newest first: this process's attach, and the detach recorded for the dead one's.
            assert [e["kind"] for e in sessions[:2]] == ["attach", "detach"]
            assert sessions[1]["data"]["cause"] == RESTARTED_CAUSE
            assert sessions[1]["data"]["attach_id"] == attached[name]
    finally:
        await asyncio.to_thread(rd.stop)
