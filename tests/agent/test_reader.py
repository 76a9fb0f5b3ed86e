"""``AgentReader`` against a fake qemu-ga: the value it returns, what it caches, how it backs
off, and that a hung, blocked, absent or lying agent is a reason and never a stall."""

from __future__ import annotations

import asyncio
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.agent.freelists import FreeLists, build_free_lists
from daemon.agent.procfs import REPORTING_INACTIVE, REPORTING_ORDER
from daemon.agent.reader import AgentProblem, AgentReader, ReaderConfig
from tests.agent.conftest import StartAgent, TransportTo
from tests.agent.fake_agent import (
    COMMANDS_7_2,
    GUEST_6_1,
    RAM_512M,
    RHEL_BLOCKED,
    Behaviour,
    FakeAgent,
    sample,
)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def reader_for(
    transport_to: TransportTo,
    path: Path,
    clock: Clock,
    config: ReaderConfig | None = None,
    **timeouts: float,
) -> AgentReader:
    config = config or ReaderConfig(command_timeout=0.5, budget=3.0)
    transport = transport_to(path, connect_timeout=timeouts.get("connect", 0.5))
    return AgentReader(transport, config, name="vm1", clock=clock, wall=clock)


def opened(agent: FakeAgent) -> int:
    return agent.commands.count("guest-file-open")


async def test_a_read_is_the_guests_free_lists(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    reader = reader_for(transport_to, agent.path, Clock())
    lists = await reader.read(RAM_512M)
    assert isinstance(lists, FreeLists)
    expected = build_free_lists(
        buddyinfo=sample(GUEST_6_1, "buddyinfo").decode(),
        meminfo=sample(GUEST_6_1, "meminfo").decode(),
        ram_bytes=RAM_512M,
        at=1000.0,
        reporting_order=9,
    )
    assert lists == expected  # the fake clock does not move: at 1000, span 0
    assert agent.commands[:2] == ["guest-sync-delimited", "guest-info"]
    assert opened(agent) == 3 and agent.open_handles == {}
    assert reader.info is not None and reader.info.version == "7.2.22"
    await reader.close()


async def test_what_is_cached_and_for_how_long(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    clock = Clock()
    config = ReaderConfig(order_ttl=60.0, info_ttl=600.0)
    reader = reader_for(transport_to, agent.path, clock, config)
    assert isinstance(await reader.read(RAM_512M), FreeLists)
    assert isinstance(await reader.read(RAM_512M), FreeLists)
    # The second read: buddyinfo and meminfo only (guest-info and the order are cached).
    assert opened(agent) == 3 + 2 and agent.commands.count("guest-info") == 1
    clock.now += 60.0
    agent.files[REPORTING_ORDER] = b"5\n"  # an administrator changed it
    lists = await reader.read(RAM_512M)
    assert isinstance(lists, FreeLists) and lists.reporting_order == 5
    assert opened(agent) == 5 + 3
    clock.now += 600.0
    await reader.read(RAM_512M)
    assert agent.commands.count("guest-info") == 2
    await reader.close()


async def test_optional_parts_become_problems_not_failures(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    del agent.files[REPORTING_ORDER]  # a kernel without page_reporting_order
    reader = reader_for(transport_to, agent.path, Clock(), ReaderConfig(pagetypeinfo=True))
    lists = await reader.read(RAM_512M)
    assert isinstance(lists, FreeLists)
    assert lists.reporting_order is None and lists.reporting_active is None
    assert lists.migratetypes is not None and lists.migratetypes.pageblock_order == 9
    (problem,) = lists.problems
    assert "page_reporting_order unreadable" in problem and "No such file" in problem

    agent.files[REPORTING_ORDER] = b"11\n"  # no reporting device registered (Linux 6.1)
    del agent.files["/proc/pagetypeinfo"]
    reader = reader_for(transport_to, agent.path, Clock(), ReaderConfig(pagetypeinfo=True))
    lists = await reader.read(RAM_512M)
    assert isinstance(lists, FreeLists)
    assert lists.reporting_order == REPORTING_INACTIVE and lists.reporting_active is False
    assert lists.migratetypes is None and "pagetypeinfo not used" in lists.problems[0]


async def test_blocked_by_guest_info_is_not_retried_in_a_loop(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(blocked=frozenset(RHEL_BLOCKED)))
    clock = Clock()
    reader = reader_for(transport_to, agent.path, clock, ReaderConfig(blocked_recheck=900.0))
    problem = await reader.read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "blocked"
    assert "guest-file-open, guest-file-read" in problem.reason
    assert "--block-rpcs" in problem.reason
    assert (problem.at, problem.retry_at) == (1000.0, 1900.0)
    sent = len(agent.commands)
    assert "guest-file-open" not in agent.commands  # guest-info said so: nothing was tried
    for _ in range(5):
        clock.now += 100.0
        assert await reader.read(RAM_512M) is problem
    assert len(agent.commands) == sent
    clock.now = 1900.0
    again = await reader.read(RAM_512M)
    assert isinstance(again, AgentProblem) and again.kind == "blocked" and again.at == 1900.0
    assert agent.commands[sent:] == ["guest-sync-delimited", "guest-info"]


async def test_blocked_by_the_call_itself(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    # guest-info claims everything is enabled, yet the open says "disabled".
    def all_enabled(_: dict[str, Any]) -> dict[str, Any]:
        commands = [{"name": c, "enabled": True, "success-response": True} for c in COMMANDS_7_2]
        return {"return": {"version": "7.2.22", "supported_commands": commands}}

    behaviour = Behaviour(
        blocked=frozenset({"guest-file-open"}), override={"guest-info": all_enabled}
    )
    agent = await fake_agent(behaviour=behaviour)
    problem = await reader_for(transport_to, agent.path, Clock()).read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "blocked"
    assert "guest-file-open is disabled" in problem.reason


async def test_an_agent_without_a_file_command(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent(behaviour=Behaviour(absent_commands=frozenset({"guest-file-close"})))
    problem = await reader_for(transport_to, agent.path, Clock()).read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "blocked"
    assert "guest-file-close" in problem.reason


async def test_an_absent_agent_backs_off_and_recovers(
    fake_agent: StartAgent, sockdir: Path, transport_to: TransportTo
) -> None:
    clock = Clock()
    config = ReaderConfig(backoff_initial=5.0, backoff_max=30.0)
    reader = reader_for(transport_to, sockdir / "vm1.qga", clock, config)
    waits = []
    for _ in range(5):
        problem = await reader.read(RAM_512M)
        assert isinstance(problem, AgentProblem) and problem.kind == "absent"
        assert "does not exist" in problem.reason
        assert await reader.read(RAM_512M) is problem  # held: no new attempt
        waits.append(problem.retry_at - problem.at)
        clock.now = problem.retry_at
    assert waits == [5.0, 10.0, 20.0, 30.0, 30.0]
    for _ in range(1100):  # days of absence: the backoff stays at its maximum
        problem = await reader.read(RAM_512M)
        assert isinstance(problem, AgentProblem) and problem.retry_at - problem.at == 30.0
        clock.now = problem.retry_at
    agent = await fake_agent("vm1")  # the VM's agent comes up
    assert isinstance(await reader.read(RAM_512M), FreeLists)
    await agent.stop()  # and goes away again: the backoff starts over
    problem = await reader.read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "absent"
    assert problem.retry_at - problem.at == 5.0
    await reader.close()


async def test_a_hung_agent_is_a_timeout(fake_agent: StartAgent, transport_to: TransportTo) -> None:
    agent = await fake_agent(behaviour=Behaviour(hang_on="guest-file-read"))
    reader = reader_for(transport_to, agent.path, Clock())
    problem = await reader.read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "timeout"
    assert problem.reason == "guest-file-read: no reply within 0.5 s"
    assert problem.retry_at - problem.at == ReaderConfig().backoff_initial


async def test_the_budget_bounds_a_slow_agent(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    # Each reply comes in time for its own timeout, but all of them together do not.
    agent = await fake_agent(behaviour=Behaviour(delay=0.15))
    config = ReaderConfig(command_timeout=0.5, budget=0.6)
    reader = reader_for(transport_to, agent.path, Clock(), config, connect=0.5)
    problem = await reader.read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "timeout"
    assert problem.reason == "the read took longer than 0.6 s"
    assert opened(agent) < 3


async def test_a_hung_agent_delays_nothing_else(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    hung = await fake_agent("hung", behaviour=Behaviour(answer=False))
    healthy = await fake_agent("healthy")
    clock = Clock()
    hung_read = asyncio.create_task(
        reader_for(transport_to, hung.path, clock, connect=2.0).read(RAM_512M)
    )
    healthy_read = asyncio.create_task(reader_for(transport_to, healthy.path, clock).read(RAM_512M))
    done, _ = await asyncio.wait({hung_read, healthy_read}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {healthy_read} and isinstance(healthy_read.result(), FreeLists)
    problem = await hung_read
    assert isinstance(problem, AgentProblem) and problem.kind == "timeout"
    assert "no answer to guest-sync-delimited" in problem.reason


async def test_a_lying_guest_is_rejected_and_tried_again(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    honest = agent.files["/proc/buddyinfo"]
    agent.files["/proc/buddyinfo"] = honest.replace(b"    98 \n", b"999999 \n")
    clock = Clock()
    reader = reader_for(transport_to, agent.path, clock)
    problem = await reader.read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "rejected"
    assert "more than the VM's 512.0 MiB of RAM" in problem.reason
    assert problem.retry_at == problem.at
    agent.files["/proc/buddyinfo"] = honest
    assert isinstance(await reader.read(RAM_512M), FreeLists)
    # A rejection keeps the connection and the caches: no new sync, no new guest-info.
    assert agent.commands.count("guest-sync-delimited") == 1
    assert agent.commands.count("guest-info") == 1
    await reader.close()


async def test_an_oversized_file_is_rejected(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    agent.files["/proc/meminfo"] = b"MemTotal: 1 kB\n" * 2000  # 30 KB, the limit is 16 KiB
    problem = await reader_for(transport_to, agent.path, Clock()).read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "rejected"
    assert problem.reason == "/proc/meminfo is larger than 16384 bytes"
    assert agent.open_handles == {}


async def test_a_bad_reply_backs_off(fake_agent: StartAgent, transport_to: TransportTo) -> None:
    behaviour = Behaviour(override={"guest-info": lambda _: b"garbage\n"})
    agent = await fake_agent(behaviour=behaviour)
    problem = await reader_for(transport_to, agent.path, Clock()).read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "bad-reply"
    assert problem.retry_at > problem.at


async def test_ram_must_be_known(sockdir: Path, transport_to: TransportTo) -> None:
    with pytest.raises(ValueError):
        await reader_for(transport_to, sockdir / "x", Clock()).read(0)


def lie_once_about_memfree(agent: FakeAgent, times: int) -> None:
    """The first ``times`` meminfo reads show a MemFree 200 MiB below the buddy lists, as when
    a batch of free page reporting falls between two reads."""
    honest = agent.files["/proc/meminfo"].decode()
    free_kib = int(honest.split("MemFree:")[1].split()[0])
    moved = honest.replace(f"{free_kib} kB", f"{free_kib - 200 * 1024} kB", 1).encode()
    served = []

    def meminfo(args: dict[str, Any]) -> dict[str, Any] | None:
        path, _ = agent.open_handles[args["handle"]]
        if path != "/proc/meminfo" or len(served) == times:
            return None
        served.append(path)
        return {"return": {"count": len(moved), "buf-b64": b64encode(moved).decode(), "eof": True}}

    agent.behaviour.override["guest-file-read"] = meminfo


async def test_files_that_disagree_for_a_moment_are_read_again_at_once(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    lie_once_about_memfree(agent, times=1)
    lists = await reader_for(transport_to, agent.path, Clock()).read(RAM_512M)
    assert isinstance(lists, FreeLists)
    assert agent.commands.count("guest-file-open") == 1 + 2 + 2  # order, then two attempts


async def test_files_that_keep_disagreeing_are_rejected(
    fake_agent: StartAgent, transport_to: TransportTo
) -> None:
    agent = await fake_agent()
    lie_once_about_memfree(agent, times=2)
    problem = await reader_for(transport_to, agent.path, Clock()).read(RAM_512M)
    assert isinstance(problem, AgentProblem) and problem.kind == "rejected"
    assert "but meminfo says MemFree" in problem.reason
    assert agent.commands.count("guest-file-open") == 1 + 2 + 2
