"""``SocketTransport`` against a fake qemu-ga on a Unix socket: the resync, timeouts, and
everything a guest can send that is not a reply."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from daemon.agent.errors import (
    AgentTimeout,
    AgentUnavailable,
    BadReply,
    CommandBlocked,
    CommandFailed,
)
from daemon.agent.transport import MAX_STALE_BYTES, READ_LIMIT
from tests.agent.conftest import StartAgent, TransportTo
from tests.agent.fake_agent import Behaviour

FAST = {"connect_timeout": 0.5}


async def test_a_command_after_the_sync(fake_agent: StartAgent, transport_to: TransportTo) -> None:
    agent = await fake_agent()
    transport = transport_to(agent.path, **FAST)
    assert await transport.command("guest-ping", None, 1.0) == {}
    info = await transport.command("guest-info", None, 1.0)
    assert info["version"] == "7.2.22"
    # One connection: the 0xFF reset (one parse error), the sync, then the commands.
    assert agent.connections == 1 and agent.parse_errors == 1
    assert agent.commands == ["guest-sync-delimited", "guest-ping", "guest-info"]
    await transport.close()
    assert not transport.connected


@pytest.mark.parametrize(
    "stale",
    [
        b'{"return": {"count": 4096, "buf-b64": "Tm9kZSAwLCB6b2',  # a half-sent reply
        b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n',
        b'\xff{"return": 12345}\n',  # an earlier client's sync reply
        b"\xff\xff garbage \xff\n\xff{not json}\n",
        b"x" * (3 * READ_LIMIT),  # more than a line may hold, and no newline
        b"\xff" + b"z" * (2 * READ_LIMIT) + b"\n",  # the same behind a stray sentinel
    ],
    ids=["half-line", "id-less-error", "old-sync", "stray-sentinels", "huge-stale", "huge-line"],
)
async def test_the_sync_skips_what_an_earlier_client_left(
    fake_agent: StartAgent, stale: bytes, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(stale_on_connect=stale))
    transport = transport_to(agent.path, **FAST)
    assert await transport.command("guest-ping", None, 1.0) == {}
    await transport.close()


async def test_endless_stale_data_gives_up(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(stale_on_connect=b"y" * (MAX_STALE_BYTES + 2)))
    transport = transport_to(agent.path, connect_timeout=5.0)
    with pytest.raises(BadReply, match="no reply to guest-sync-delimited"):
        await transport.command("guest-ping", None, 1.0)


async def test_no_socket(sockdir: Path, transport_to: TransportTo) -> None:
    transport = transport_to(sockdir / "missing.qga", **FAST)
    with pytest.raises(AgentUnavailable, match="does not exist") as caught:
        await transport.command("guest-ping", None, 1.0)
    assert caught.value.kind == "absent"


async def test_nothing_listening(sockdir: Path, transport_to: TransportTo) -> None:
    path = sockdir / "dead.qga"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # a socket file left behind by a QEMU that is gone
    transport = transport_to(path, **FAST)
    with pytest.raises(AgentUnavailable, match="nothing listens"):
        await transport.command("guest-ping", None, 1.0)


async def test_an_agent_that_never_answers(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    # QEMU accepts the connection whether or not qemu-ga runs in the guest.
    agent = await fake_agent(behaviour=Behaviour(answer=False))
    transport = transport_to(agent.path, connect_timeout=0.3)
    with pytest.raises(AgentTimeout, match="qemu-ga not running in the guest, hung") as caught:
        await transport.command("guest-ping", None, 1.0)
    assert caught.value.kind == "timeout"
    assert not transport.connected


async def test_a_late_reply_is_never_taken_for_the_next_one(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(delay=0.4))
    transport = transport_to(agent.path, connect_timeout=2.0)
    with pytest.raises(AgentTimeout, match=r"guest-info: no reply within 0\.2 s"):
        await transport.command("guest-info", None, 0.2)
    agent.behaviour.delay = 0.0
    await asyncio.sleep(0.3)  # the guest-info reply goes out now, on the dropped connection
    assert await transport.command("guest-ping", None, 1.0) == {}
    assert agent.connections == 2
    await transport.close()


async def test_blocked_and_failed_commands(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    behaviour = Behaviour(blocked=frozenset({"guest-file-open"}))
    agent = await fake_agent(behaviour=behaviour)
    transport = transport_to(agent.path, **FAST)
    with pytest.raises(CommandBlocked, match="disabled in the agent") as blocked:
        await transport.command("guest-file-open", {"path": "/proc/buddyinfo", "mode": "r"}, 1.0)
    assert blocked.value.command == "guest-file-open" and blocked.value.kind == "blocked"
    with pytest.raises(CommandBlocked, match="not offered"):
        await transport.command("guest-frobnicate", None, 1.0)
    with pytest.raises(CommandFailed, match="has not been found") as failed:
        await transport.command("guest-file-read", {"handle": 7, "count": 10}, 1.0)
    assert failed.value.error_class == "GenericError"
    # The agent's error reply stays the cause.
    assert isinstance(failed.value.__cause__, ExecuteError)
    assert isinstance(blocked.value.__cause__, ExecuteError)
    # Error replies leave the connection as it was.
    assert transport.connected and agent.connections == 1
    await transport.close()


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"this is not json\n", "not JSON"),
        (b"[1, 2, 3]\n", "not an object"),
        (b'{"return": "' + b"x" * (2 * READ_LIMIT) + b'"}\n', f"longer than {READ_LIMIT} bytes"),
        (b'{"return": "\xff\xfe"}\n', "not JSON"),
    ],
    ids=["not-json", "not-an-object", "over-the-limit", "not-utf8"],
)
async def test_replies_that_break_the_protocol(
    fake_agent: StartAgent, reply: bytes, why: str, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(override={"guest-ping": lambda _: reply}))
    transport = transport_to(agent.path, **FAST)
    with pytest.raises(BadReply, match=why) as caught:
        await transport.command("guest-ping", None, 1.0)
    assert caught.value.__cause__ is not None  # the reader's own error
    # A fresh connection (with its own sync) serves the next command.
    assert (await transport.command("guest-info", None, 1.0))["version"] == "7.2.22"
    assert agent.connections == 2
    await transport.close()


async def test_stray_lines_are_dropped_and_a_flood_ends_the_connection(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    stray = b'{"error": {"class": "GenericError", "desc": "stray"}}\n{"return": 1, "id": "old"}\n'
    agent = await fake_agent(behaviour=Behaviour(before_reply=stray))
    transport = transport_to(agent.path, **FAST)
    for _ in range(4):  # 8 stray lines: tolerated
        assert await transport.command("guest-ping", None, 1.0) == {}
    assert transport.connected and agent.connections == 1

    agent.behaviour.before_reply = b""
    agent.behaviour.events_after_reply = 100
    assert await transport.command("guest-ping", None, 1.0) == {}
    for _ in range(50):  # the reader sees the flood after the reply
        if not transport.connected:
            break
        await asyncio.sleep(0.01)
    assert not transport.connected
    with pytest.raises(BadReply, match="events or unrequested replies"):
        # The next command meets the broken connection's cause, or a new connection's flood.
        for _ in range(3):
            await transport.command("guest-ping", None, 1.0)
            await asyncio.sleep(0.05)
    await transport.close()


async def test_the_agent_hangs_up_mid_command(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(hangup_on="guest-info"))
    transport = transport_to(agent.path, **FAST)
    with pytest.raises(AgentUnavailable, match="closed the connection"):
        await transport.command("guest-info", None, 1.0)
    assert not transport.connected


async def test_a_cancelled_command_leaves_the_transport_usable(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(delay=0.5))
    transport = transport_to(agent.path, connect_timeout=2.0)
    task = asyncio.create_task(transport.command("guest-info", None, 5.0))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    agent.behaviour.delay = 0.0
    assert await transport.command("guest-ping", None, 1.0) == {}
    assert agent.connections == 2
    await transport.close()


async def test_overlapping_commands_share_one_connection(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    transport = transport_to(agent.path, **FAST)
    names = ["guest-ping", "guest-info", "guest-ping", "guest-info"]
    replies = await asyncio.gather(*(transport.command(n, None, 1.0) for n in names))
    assert [r == {} for r in replies] == [True, False, True, False]
    assert agent.connections == 1 and agent.commands[1:] == names
