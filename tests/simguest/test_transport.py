"""The monitor over real Unix sockets: one client at a time, events, and QEMU's reconnect."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.simguest.guest import SimGuest, SimGuestSpec

MiB = 1 << 20


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[SimGuest]:
    g = SimGuest(SimGuestSpec(name="t", ram_bytes=8 * MiB, socket=tmp_path / "t.qmp"), None)
    await g.start()
    try:
        yield g
    finally:
        await g.close()


async def read_msg(reader: asyncio.StreamReader, timeout: float = 2.0) -> Any:
    return json.loads(await asyncio.wait_for(reader.readline(), timeout))


async def send(writer: asyncio.StreamWriter, execute: str, **arguments: Any) -> None:
    request: dict[str, Any] = {"execute": execute}
    if arguments:
        request["arguments"] = arguments
    writer.write(json.dumps(request).encode())
    await writer.drain()


async def test_second_client_is_greeted_only_after_the_first_leaves(guest: SimGuest) -> None:
    path = str(guest.spec.socket)
    r1, w1 = await asyncio.open_unix_connection(path)
    assert "QMP" in await read_msg(r1)
    r2, w2 = await asyncio.open_unix_connection(path)
    with pytest.raises(TimeoutError):
        await read_msg(r2, timeout=0.3)
    w1.close()
    await w1.wait_closed()
    assert "QMP" in await read_msg(r2)
    w2.close()
    await w2.wait_closed()


async def test_events_reach_a_client_only_after_negotiation(guest: SimGuest) -> None:
    reader, writer = await asyncio.open_unix_connection(str(guest.spec.socket))
    await read_msg(reader)
    guest.machine.stop()  # STOP before negotiation: QEMU does not send it to this client
    await send(writer, "qmp_capabilities")
    assert await read_msg(reader) == {"return": {}}
    await send(writer, "cont")
    resume = await read_msg(reader)
    assert resume["event"] == "RESUME" and set(resume["timestamp"]) == {"seconds", "microseconds"}
    assert await read_msg(reader) == {"return": {}}
    writer.close()
    await writer.wait_closed()


async def test_quit_replies_then_the_guest_exits_and_removes_its_sockets(
    guest: SimGuest,
) -> None:
    path = guest.spec.socket
    assert path is not None
    reader, writer = await asyncio.open_unix_connection(str(path))
    await read_msg(reader)
    await send(writer, "qmp_capabilities")
    await read_msg(reader)
    await send(writer, "quit")
    shutdown = await read_msg(reader)
    assert shutdown["event"] == "SHUTDOWN"
    assert await read_msg(reader) == {"return": {}}
    await asyncio.wait_for(guest.wait_exit(), 2)
    await guest.close()
    assert await reader.read() == b""
    assert sorted(os.listdir(path.parent)) == []  # no QMP or truth socket left behind
    writer.close()


async def test_listening_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "stale.qmp"
    path.write_text("left behind by a crash")
    g = SimGuest(SimGuestSpec(name="s", ram_bytes=4 * MiB, socket=path), None)
    await g.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert "QMP" in await read_msg(reader)
        writer.close()
    finally:
        await g.close()


async def test_connect_out_retries_and_reconnects_like_qemu(tmp_path: Path) -> None:
    """QEMU ``-chardev socket,path=P,reconnect=N`` against a manager listening on P."""
    path = tmp_path / "manager.sock"
    spec = SimGuestSpec(name="out", ram_bytes=4 * MiB, connect=path, reconnect=0.2)
    g = SimGuest(spec, None)
    await g.start()  # nobody listens yet: the guest keeps trying
    connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    connections = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await connections.put((reader, writer))

    await asyncio.sleep(0.3)
    server = await asyncio.start_unix_server(accept, path=str(path))
    try:
        reader, writer = await asyncio.wait_for(connections.get(), 2)
        assert "QMP" in await read_msg(reader)
        await send(writer, "qmp_capabilities")
        await read_msg(reader)
        await send(writer, "query-name")
        assert await read_msg(reader) == {"return": {"name": "out"}}
        writer.close()  # the manager restarts: the guest comes back with a fresh greeting
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.wait_for(connections.get(), 2)
        assert loop.time() - started >= 0.15
        assert "QMP" in await read_msg(reader)
        await send(writer, "query-status")
        assert (await read_msg(reader))["error"]["class"] == "CommandNotFound"
        writer.close()
    finally:
        server.close()
        await g.close()


async def test_an_idle_guest_without_a_driver_sleeps(guest: SimGuest) -> None:
    """Stats polling with nobody to answer must not spin the event loop."""
    reader, writer = await asyncio.open_unix_connection(str(guest.spec.socket))
    await read_msg(reader)
    await send(writer, "qmp_capabilities")
    await read_msg(reader)
    path = "/machine/peripheral/balloon0"
    await send(writer, "qom-set", path=path, property="guest-stats-polling-interval", value=1)
    assert await read_msg(reader) == {"return": {}}
    cpu = time.process_time()
    await asyncio.sleep(1.0)
    assert time.process_time() - cpu < 0.2
    writer.close()
