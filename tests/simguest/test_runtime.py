"""A simulated guest with its guest OS, in this process, driven over QMP."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.simguest.guest import SimGuest, SimGuestSpec
from daemon.simguest.process import default_guest_os
from daemon.simguest.truth import read_truth_async, truth_path

MiB = 1 << 20
BALLOON = "/machine/peripheral/balloon0"


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, path: Path) -> Client:
        client = cls(*await asyncio.open_unix_connection(str(path)))
        await client.reader.readline()
        await client.execute("qmp_capabilities")
        return client

    async def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        while True:
            msg = json.loads(await asyncio.wait_for(self.reader.readline(), 5))
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg.get("return", msg)

    def close(self) -> None:
        self.writer.close()


async def start(tmp_path: Path, **kw: Any) -> SimGuest:
    spec = SimGuestSpec(name="rt", ram_bytes=128 * MiB, socket=tmp_path / "rt.qmp", **kw)
    guest = SimGuest(spec, default_guest_os())
    await guest.start()
    return guest


@pytest.fixture
async def sim_guest(tmp_path: Path) -> AsyncIterator[Path]:
    guest = await start(tmp_path, workload="idle")
    try:
        yield tmp_path / "rt.qmp"
    finally:
        await guest.close()


async def test_stats_follow_the_polling_interval(sim_guest: Path) -> None:
    c = await Client.open(sim_guest)
    first = await c.execute("qom-get", path=BALLOON, property="guest-stats")
    assert first["last-update"] > 0  # pushed when the driver loaded
    await c.execute("qom-set", path=BALLOON, property="guest-stats-polling-interval", value=1)
    seen = set()
    for _ in range(12):
        await asyncio.sleep(0.25)
        seen.add((await c.execute("qom-get", path=BALLOON, property="guest-stats"))["last-update"])
    c.close()
    # Three seconds of 1 s polling: the timestamp moved every second (whole seconds, as QEMU).
    assert len(seen) >= 3


async def test_a_paused_guest_stands_still_and_resumes(tmp_path: Path) -> None:
    guest = await start(tmp_path, workload="memhog")
    try:
        c = await Client.open(tmp_path / "rt.qmp")
        await c.execute("stop")
        truth = truth_path(tmp_path / "rt.qmp")
        before = await read_truth_async(truth)
        await asyncio.sleep(0.5)
        after = await read_truth_async(truth)
        assert after["virtual_time"] == before["virtual_time"]
        assert after["components"] == before["components"]
        await c.execute("cont")
        await asyncio.sleep(0.5)
        resumed = await read_truth_async(truth)
        assert resumed["virtual_time"] > before["virtual_time"]
        assert [e["event"] for e in c.events] == ["STOP", "RESUME"]
        c.close()
    finally:
        await guest.close()


async def test_prelaunch_guest_boots_on_cont(tmp_path: Path) -> None:
    guest = await start(tmp_path, workload="idle", start_paused=True)
    try:
        c = await Client.open(tmp_path / "rt.qmp")
        stats = await c.execute("qom-get", path=BALLOON, property="guest-stats")
        assert stats["last-update"] == 0  # no driver yet: the guest has not run
        truth = await read_truth_async(truth_path(tmp_path / "rt.qmp"))
        assert truth["components"]["resident"] == 0
        await c.execute("cont")
        stats = await c.execute("qom-get", path=BALLOON, property="guest-stats")
        assert stats["last-update"] > 0
        truth = await read_truth_async(truth_path(tmp_path / "rt.qmp"))
        assert truth["components"]["resident"] > 0  # the kernel wrote its reservations
        c.close()
    finally:
        await guest.close()


async def test_reset_reboots_the_guest_but_the_host_keeps_its_memory(tmp_path: Path) -> None:
    guest = await start(tmp_path, workload="memhog")
    try:
        c = await Client.open(tmp_path / "rt.qmp")
        await asyncio.sleep(1.0)  # memhog allocates half of RAM in its first second
        truth = truth_path(tmp_path / "rt.qmp")
        busy = await read_truth_async(truth)
        await c.execute("system_reset")
        fresh = await read_truth_async(truth)
        assert fresh["components"]["used"] < busy["components"]["used"]
        # QEMU does not discard guest RAM on reset: what was resident stays resident.
        assert fresh["components"]["resident"] >= busy["components"]["resident"]
        assert [e["event"] for e in c.events] == ["RESET"]
        c.close()
    finally:
        await guest.close()


async def test_balloon_change_events_are_throttled_to_one_per_second(sim_guest: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sim_guest))
    try:
        await reader.readline()
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        writer.write(b'{"execute": "balloon", "arguments": {"value": 67108864}}\n')
        await writer.drain()
        changes: list[tuple[float, dict[str, Any]]] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0
        while (left := end - loop.time()) > 0:
            try:
                line = await asyncio.wait_for(reader.readline(), left)
            except TimeoutError:
                break
            msg = json.loads(line)
            if msg.get("event") == "BALLOON_CHANGE":
                changes.append((loop.time(), msg))
    finally:
        writer.close()
    assert changes and changes[-1][1]["data"] == {"actual": 64 << 20}
    # The first step of the inflation is announced at once, the final size when the 1 s
    # throttle period ends: never two deliveries within one period.
    assert len(changes) >= 2, changes
    arrivals = [at for at, _ in changes]
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(arrivals)), arrivals
    # The timestamp is when the change happened, even for an event held back by the throttle.
    stamps = [m["timestamp"]["seconds"] + m["timestamp"]["microseconds"] / 1e6 for _, m in changes]
    assert stamps == sorted(stamps)
    assert stamps[-1] < arrivals[-1] - arrivals[0] + stamps[0]
