"""QMPConnection against a fake QMP server at the socket seam, misbehaving ones included."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import pytest
from qemu.qmp import Message

from daemon.config import Address
from daemon.qmp.connection import QMPConnection
from daemon.qmp.errors import CommandFailed, CommandTimeout, ConnectFailed, SessionLost
from tests.qmp.fake_qmp import Behaviour


def addr(server: Any) -> Address:
    return Address("unix", path=str(server.path))


async def test_connects_negotiates_and_runs_commands(fake_qmp: Any) -> None:
    server = await fake_qmp()
    conn = QMPConnection("t", command_timeout=1)
    await conn.connect(addr(server), timeout=1)
    assert conn.qemu_version == ("7.2.22", "fake")
    assert conn.peer_pid == os.getpid()  # the fake runs in this process
    assert await conn.execute("query-balloon") == {"actual": 512 * 1024 * 1024}
    assert server.commands == ["qmp_capabilities", "query-balloon"]
    assert await conn.close() is None


async def test_qemu_error_becomes_command_failed(fake_qmp: Any) -> None:
    server = await fake_qmp()
    conn = QMPConnection("t", command_timeout=1)
    await conn.connect(addr(server), timeout=1)
    with pytest.raises(CommandFailed) as info:
        await conn.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    assert conn.connected  # an error reply does not end the session
    await conn.close()


async def test_socket_that_never_greets_times_out(fake_qmp: Any) -> None:
    server = await fake_qmp(behaviour=Behaviour(greet=False))
    conn = QMPConnection("t", command_timeout=1)
    started = time.monotonic()
    with pytest.raises(ConnectFailed, match="no QMP greeting"):
        await conn.connect(addr(server), timeout=0.5)
    assert time.monotonic() - started < 2


async def test_missing_socket_is_a_clear_connect_error(sockdir: Any) -> None:
    conn = QMPConnection("t", command_timeout=1)
    with pytest.raises(ConnectFailed, match="No such file"):
        await conn.connect(Address("unix", path=str(sockdir / "absent.qmp")), timeout=1)


async def test_hung_monitor_times_out_each_command(fake_qmp: Any) -> None:
    server = await fake_qmp(behaviour=Behaviour(answer=False))
    conn = QMPConnection("t", command_timeout=0.3)
    await conn.connect(addr(server), timeout=1)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        await conn.execute("query-status")
    assert 0.25 < time.monotonic() - started < 1.5
    await conn.close()


async def test_malformed_json_ends_the_session_with_its_cause(fake_qmp: Any) -> None:
    server = await fake_qmp(behaviour=Behaviour(garbage_after="query-name"))
    conn = QMPConnection("t", command_timeout=1)
    await conn.connect(addr(server), timeout=1)
    await conn.execute("query-name")
    await asyncio.wait_for(conn.wait_lost(), 2)
    with pytest.raises(SessionLost):
        await conn.execute("query-status")
    cause = await conn.close()
    assert cause is not None and "deserialize" in cause and len(cause) <= 240


async def test_ten_mib_line_is_cut_off(fake_qmp: Any) -> None:
    server = await fake_qmp(behaviour=Behaviour(huge_line_after="query-name"))
    conn = QMPConnection("t", command_timeout=2)
    await conn.connect(addr(server), timeout=1)
    with pytest.raises(SessionLost):
        await conn.execute("query-name")
    assert not conn.connected
    cause = await conn.close()
    assert cause is not None and len(cause) <= 240


async def test_hangup_mid_command(fake_qmp: Any) -> None:
    server = await fake_qmp(behaviour=Behaviour(hangup_on="query-status"))
    conn = QMPConnection("t", command_timeout=2)
    await conn.connect(addr(server), timeout=1)
    with pytest.raises(SessionLost):
        await conn.execute("query-status")
    assert await conn.close() == "connection closed by peer"


async def test_event_queue_is_bounded(fake_qmp: Any) -> None:
    server = await fake_qmp()
    conn = QMPConnection("t", command_timeout=1, event_queue_size=8)
    await conn.connect(addr(server), timeout=1)
    for i in range(50):
        await server.emit("BALLOON_CHANGE", {"actual": i})
    await conn.execute("query-status")  # a round trip: every event before it has been read
    assert conn.events_dropped == 42
    first = await conn.next_event()
    assert first["data"]["actual"] == 42  # the oldest were dropped, the newest kept
    await conn.close()


async def test_messages_are_logged_only_when_debug_logging_is_on(
    fake_qmp: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await fake_qmp()
    rendered: list[str] = []
    pretty = Message.__str__

    def counting_str(msg: Message) -> str:
        rendered.append(pretty(msg))
        return rendered[-1]

    monkeypatch.setattr(Message, "__str__", counting_str)
    conn = QMPConnection("t", command_timeout=1)
    await conn.connect(addr(server), timeout=1)
    with caplog.at_level(logging.INFO, logger="qemu.qmp"):
        await conn.execute("query-balloon")
    assert rendered == []  # nobody reads the debug log: no pretty-printed copy is made
    with caplog.at_level(logging.DEBUG, logger="qemu.qmp"):
        await conn.execute("query-balloon")
    assert any(
        "--> " in r.getMessage() and "query-balloon" in r.getMessage() for r in caplog.records
    )
    assert any("<-- " in r.getMessage() and "actual" in r.getMessage() for r in caplog.records)
    await conn.close()


async def test_garbage_right_after_negotiation_is_a_connect_failure_or_a_loss(
    fake_qmp: Any,
) -> None:
    # qemu.qmp asserts its session runs once negotiated: a peer that breaks it at that moment
    # must cost its connection only, never raise something a session does not handle.
    server = await fake_qmp(behaviour=Behaviour(garbage_after="qmp_capabilities"))
    outcomes = set()
    for _ in range(20):
        conn = QMPConnection("t", command_timeout=1)
        try:
            await conn.connect(addr(server), timeout=1)
        except ConnectFailed:
            outcomes.add("refused")
        else:
            await conn.wait_lost()
            outcomes.add("lost")
        await conn.close()
    assert outcomes <= {"refused", "lost"} and outcomes


async def test_a_command_behind_a_flood_waits_while_the_peer_sends(fake_qmp: Any) -> None:
    server = await fake_qmp()
    conn = QMPConnection("t", command_timeout=0.2, event_queue_size=100_000)
    await conn.connect(addr(server), timeout=1)
    # More events ahead of the reply than the reader parses in one timeout.
    await server.emit_many([{"event": "X", "data": {"n": i}} for i in range(60_000)])
    assert await conn.execute("query-balloon") == {"actual": 512 * 1024 * 1024}
    await conn.close()
