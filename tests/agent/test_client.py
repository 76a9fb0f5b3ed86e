"""``AgentClient`` over the socket transport and a fake qemu-ga: guest-info, read-only file
reads in chunks, and handles that are always closed."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from daemon.agent.client import FILE_COMMANDS, AgentClient, parse_info
from daemon.agent.errors import (
    AgentTimeout,
    BadReply,
    CommandBlocked,
    CommandFailed,
    GuestDataRejected,
)
from tests.agent.conftest import StartAgent, TransportTo
from tests.agent.fake_agent import COMMANDS_7_2, RHEL_BLOCKED, Behaviour, FakeAgent

# What the client may ever send: nothing that writes to the guest or runs anything in it.
READ_ONLY = {"guest-sync-delimited", "guest-info", *FILE_COMMANDS}


def client_for(transport_to: TransportTo, agent: FakeAgent, timeout: float = 1.0) -> AgentClient:
    return AgentClient(transport_to(agent.path, connect_timeout=1.0), timeout=timeout)


def read_args(agent: FakeAgent) -> list[str]:
    return [c for c in agent.commands if c == "guest-file-read"]


async def test_info_lists_the_enabled_commands(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(blocked=frozenset(RHEL_BLOCKED)))
    info = await client_for(transport_to, agent).info()
    assert info.version == "7.2.22"
    assert info.disabled == frozenset(RHEL_BLOCKED)
    assert info.enabled | info.disabled == frozenset(COMMANDS_7_2)
    assert info.unavailable(FILE_COMMANDS) == ("guest-file-open", "guest-file-read")
    assert info.unavailable(("guest-frobnicate",)) == ("guest-frobnicate",)


@pytest.mark.parametrize(
    "reply",
    [
        [],
        {"version": 7, "supported_commands": []},
        {"version": "7.2", "supported_commands": {}},
        {"version": "7.2", "supported_commands": [{"name": "guest-info", "enabled": "yes"}]},
        {"version": "7.2", "supported_commands": [{"name": "", "enabled": True}]},
        {"version": "7.2", "supported_commands": [{"name": "x" * 65, "enabled": True}]},
        {"version": "7.2", "supported_commands": [{"name": "a\nb", "enabled": True}]},
        {"version": "7.2", "supported_commands": [{"name": "x", "enabled": True}] * 1025},
    ],
)
def test_info_rejects_what_is_not_a_guest_info(reply: Any) -> None:
    with pytest.raises(BadReply, match="guest-info"):
        parse_info(reply)


async def test_read_file_in_chunks(fake_agent: StartAgent, transport_to: TransportTo) -> None:
    content = bytes(range(256)) * 40  # 10 KiB, every byte value
    agent = await fake_agent(files={"/proc/x": content})
    client = client_for(transport_to, agent)
    assert await client.read_file("/proc/x", limit=len(content), chunk=3000) == content
    assert len(read_args(agent)) == 4  # 3000 + 3000 + 3000 + 1240 (short: eof)
    assert agent.open_handles == {}
    assert set(agent.commands) <= READ_ONLY


async def test_a_file_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(files={"/a": b"x" * 100, "/b": b"x" * 101})
    client = client_for(transport_to, agent)
    assert await client.read_file("/a", limit=100) == b"x" * 100
    with pytest.raises(GuestDataRejected, match="larger than 100 bytes"):
        await client.read_file("/b", limit=100)
    assert agent.open_handles == {}


async def test_a_missing_file_fails_with_the_agents_reason(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    with pytest.raises(CommandFailed, match="No such file or directory"):
        await client_for(transport_to, agent).read_file("/sys/nothing", limit=100)


async def test_blocked_file_commands(fake_agent: StartAgent, transport_to: TransportTo) -> None:
    agent = await fake_agent(behaviour=Behaviour(blocked=frozenset(RHEL_BLOCKED)))
    with pytest.raises(CommandBlocked, match="guest-file-open is disabled"):
        await client_for(transport_to, agent).read_file("/proc/buddyinfo", limit=100)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("command", "reply", "why"),
    [
        ("guest-file-open", {"return": "1000"}, "handle is not"),
        ("guest-file-open", {"return": -1}, "handle is not"),
        ("guest-file-open", {"return": True}, "handle is not"),
        ("guest-file-read", {"return": {"count": 3, "buf-b64": "!!!!", "eof": True}}, "base64"),
        ("guest-file-read", {"return": {"count": 5, "buf-b64": b64(b"abc"), "eof": True}}, "count"),
        ("guest-file-read", {"return": {"count": 3, "buf-b64": b64(b"abc")}}, "eof"),
        ("guest-file-read", {"return": {"count": 3.0, "buf-b64": b64(b"abc"), "eof": 1}}, "eof"),
        ("guest-file-read", {"return": [b64(b"abc")]}, "expected an object"),
        # More than was asked for: 200 bytes to a read of at most 101.
        ("guest-file-read", {"return": {"count": 200, "buf-b64": b64(b"y" * 200)}}, "eof"),
        (
            "guest-file-read",
            {"return": {"count": 200, "buf-b64": b64(b"y" * 200), "eof": True}},
            "asked for 101",
        ),
    ],
)
async def test_lying_replies_are_bad_replies_and_the_handle_is_closed(
    fake_agent: StartAgent, command: str, reply: dict[str, Any], why: str, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(override={command: lambda _: dict(reply)}))
    with pytest.raises(BadReply, match=why):
        await client_for(transport_to, agent).read_file("/proc/buddyinfo", limit=100)
    if command == "guest-file-read":
        assert agent.commands[-1] == "guest-file-close" and agent.open_handles == {}


async def test_an_empty_chunk_without_eof_ends_the_read(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    empty = {"return": {"count": 0, "buf-b64": "", "eof": False}}
    agent = await fake_agent(behaviour=Behaviour(override={"guest-file-read": lambda _: empty}))
    assert await client_for(transport_to, agent).read_file("/proc/buddyinfo", limit=100) == b""
    assert read_args(agent) == ["guest-file-read"]


async def test_a_handle_cut_off_by_a_timeout_is_closed_on_the_next_read(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(hang_on="guest-file-read"))
    client = client_for(transport_to, agent, timeout=0.2)
    with pytest.raises(AgentTimeout):
        await client.read_file("/proc/buddyinfo", limit=4096)
    assert len(agent.open_handles) == 1  # nothing could close it: the agent hangs
    agent.behaviour.hang_on = None
    agent.behaviour.answer = True
    data = await client.read_file("/proc/meminfo", limit=4096)
    assert data.startswith(b"MemTotal:")
    assert agent.open_handles == {}
    # The orphan was closed first, on the new connection, before the next open.
    tail = agent.commands[agent.commands.index("guest-sync-delimited", 1) :]
    assert tail[:3] == ["guest-sync-delimited", "guest-file-close", "guest-file-open"]


async def test_files_read_together_are_read_back_to_back(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(files={"/a": b"A" * 10, "/b": b"B" * 20})
    client = client_for(transport_to, agent)
    assert await client.read_files([("/a", 100), ("/b", 100)]) == [b"A" * 10, b"B" * 20]
    # Opens, then both reads one after the other, then closes: nothing between the reads.
    assert agent.commands[1:] == [
        "guest-file-open",
        "guest-file-open",
        "guest-file-read",
        "guest-file-read",
        "guest-file-close",
        "guest-file-close",
    ]
    assert agent.open_handles == {}


async def test_one_missing_file_fails_the_read_and_closes_the_other(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(files={"/a": b"A"})
    client = client_for(transport_to, agent)
    with pytest.raises(CommandFailed, match="'/missing'"):
        await client.read_files([("/a", 100), ("/missing", 100)])
    assert agent.open_handles == {}
    assert "guest-file-read" not in agent.commands
