"""The real qemu-ga in the real test guest, read through ``daemon.agent``: the free lists it
returns are the guest's own, and a hung, stopped, lying or blocked agent is a clear reason that
delays nothing else.

Two boots: one guest shared by the module (its agent is paused, stopped and lied to in turn,
and put back after each test), and one whose agent starts with ``--block-rpcs`` as
RHEL-family guests ship it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from daemon.agent import (
    AgentProblem,
    AgentReader,
    FreeLists,
    ReaderConfig,
    SocketTransport,
    parse_buddyinfo,
)
from daemon.model.constants import PAGE_SIZE
from daemon.testguest import ControlError, GuestImage, QemuGuestSpec, RunningGuest, fields, launch
from tests.e2e.conftest import wait_guest_ready

pytestmark = pytest.mark.e2e

MIB = 1 << 20
RAM_MIB = 512
RAM = RAM_MIB * MIB
# Short timeouts: the e2e cases that wait on them (hung, stopped) cost these seconds.
CONFIG = ReaderConfig(command_timeout=2.0, budget=10.0, backoff_initial=0.0)
CONNECT_TIMEOUT = 3.0
ATTEMPTS = 10
RHEL_BLOCKED = ("guest-file-open", "guest-file-read", "guest-file-write", "guest-exec")


@pytest.fixture(scope="module")
def guest(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGuest]:
    running = launch(
        QemuGuestSpec(name="agent", ram_bytes=RAM_MIB << 20),
        guest_image,
        tmp_path_factory.mktemp("agent"),
    )
    try:
        wait_guest_ready(running)
        yield running
    finally:
        running.close()


@pytest.fixture
def reader(guest: RunningGuest) -> Iterator[AgentReader]:
    """A reader of the shared guest; its agent is running, unblocked and unmasked after each
    test (QEMU serves the agent socket to one client at a time, so each test closes its
    reader)."""
    assert guest.agent_path is not None
    yield AgentReader(SocketTransport(guest.agent_path, connect_timeout=CONNECT_TIMEOUT), CONFIG)
    with contextlib.suppress(ControlError):  # "ERR unmask ... is not masked"
        guest.send("unmask /proc/buddyinfo")
    if fields(guest.send("agent status"))["state"] != "running":
        guest.send("agent start")


def control_buddyinfo(guest: RunningGuest) -> dict[tuple[int, str], tuple[int, ...]]:
    """The guest's /proc/buddyinfo as its shell prints it over the control channel."""
    zones = {}
    for key, counts in fields(guest.send("buddyinfo")).items():
        node, zone = key.split(":")
        zones[(int(node), zone)] = tuple(int(c) for c in counts.split(","))
    return zones


def agent_zones(lists: FreeLists) -> dict[tuple[int, str], tuple[int, ...]]:
    return {(z.node, z.zone): z.free_blocks for z in lists.zones}


async def read_lists(reader: AgentReader) -> FreeLists:
    result = await reader.read(RAM)
    assert isinstance(result, FreeLists), result
    return result


async def test_the_agents_free_lists_are_the_guests_own(
    guest: RunningGuest, reader: AgentReader
) -> None:
    # Agent, control channel, agent: when both agent reads agree, the lists (most likely) did
    # not move in between, and the guest's own print, taken in between, must equal them. The
    # low orders jitter a little (per-CPU list refills), so a few attempts are allowed.
    attempts = []
    try:
        for _ in range(ATTEMPTS):
            before = agent_zones(await read_lists(reader))
            shell = await asyncio.to_thread(control_buddyinfo, guest)
            after = agent_zones(await read_lists(reader))
            attempts.append((before, shell, after))
            if before == shell == after:
                break
        else:
            pytest.fail(f"agent and guest never agreed in {ATTEMPTS} attempts: {attempts}")
        lists = await read_lists(reader)
        status = fields(guest.send("status"))
    finally:
        await reader.close()
    assert lists.reporting_order == 9 == int(status["page_reporting_order"])
    assert lists.problems == ()
    assert lists.mem_total_bytes == int(status["memtotal_kib"]) * 1024
    # Most of an idle 512 MiB guest is free, and most of that in order-10 blocks.
    assert lists.free_bytes > 300 * MIB
    assert lists.by_order_pages[10] * PAGE_SIZE > 0.8 * lists.free_bytes


async def test_an_allocation_and_its_free_show_in_the_high_orders(
    guest: RunningGuest, reader: AgentReader
) -> None:
    try:
        idle = await read_lists(reader)
        await asyncio.to_thread(guest.send, "alloc 100", 60)
        allocated = await read_lists(reader)
        await asyncio.to_thread(guest.send, "free")
        freed = await read_lists(reader)
    finally:
        await reader.close()
    high = [lists.free_bytes_from(9) for lists in (idle, allocated, freed)]
    assert high[0] - high[1] >= 90 * MIB, f"order >= 9 free: {[h // MIB for h in high]} MiB"
    assert high[2] - high[1] >= 90 * MIB, f"order >= 9 free: {[h // MIB for h in high]} MiB"


async def test_a_hung_agent_is_a_timeout_and_delays_nothing_else(
    guest: RunningGuest, reader: AgentReader
) -> None:
    await read_lists(reader)  # connected, guest-info known
    assert fields(guest.send("agent pause"))["state"] == "paused"
    assert guest.qmp_path is not None
    qmp = QMPClient("e2e-agent")
    await asyncio.wait_for(qmp.connect(str(guest.qmp_path)), 10)
    try:
        agent_read = asyncio.create_task(reader.read(RAM))
        monitor = asyncio.create_task(qmp.execute("query-status"))
        done, _ = await asyncio.wait({agent_read, monitor}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {monitor}, "the QMP monitor waited on the hung agent"
        assert (await monitor)["status"] == "running"  # type: ignore[index]
        problem = await agent_read
    finally:
        await qmp.disconnect()
        await reader.close()
    assert isinstance(problem, AgentProblem) and problem.kind == "timeout"
    assert problem.reason == "guest-file-open: no reply within 2 s"
    guest.send("agent resume")
    try:
        assert isinstance(await reader.read(RAM), FreeLists)  # resynced after the stale replies
    finally:
        await reader.close()


async def test_a_stopped_agent_is_a_clear_reason(guest: RunningGuest, reader: AgentReader) -> None:
    assert fields(guest.send("agent stop"))["state"] == "stopped"
    try:
        problem = await reader.read(RAM)
    finally:
        await reader.close()
    assert isinstance(problem, AgentProblem) and problem.kind == "timeout"
    assert "no answer to guest-sync-delimited within 3 s" in problem.reason
    assert "qemu-ga not running in the guest" in problem.reason


def masked(text: bytes, replace: bytes, by: bytes) -> str:
    assert replace in text
    return base64.b64encode(text.replace(replace, by, 1)).decode()


async def test_a_lying_guest_is_rejected(guest: RunningGuest, reader: AgentReader) -> None:
    # The guest shows the agent other files (a bind mount over /proc), as a tampered guest can.
    try:
        honest = (await reader.client.read_file("/proc/buddyinfo", limit=4096)).strip() + b" \n"
        order10 = honest.split(b"\n")[-2].split()[-1]
        parse_buddyinfo(honest.decode())  # what is masked below is a real print, edited
        above_ram = masked(honest, b" " + order10 + b" \n", b" 999999 \n")
        guest.send(f"mask /proc/buddyinfo {above_ram}")
        problem = await reader.read(RAM)
        assert isinstance(problem, AgentProblem) and problem.kind == "rejected", problem
        assert "more than the VM's 512.0 MiB of RAM" in problem.reason
        guest.send("unmask /proc/buddyinfo")

        # Order-10 blocks halved: still plausible alone, but not what MemFree says.
        half = str(int(order10) // 2).encode()
        too_few = masked(honest, b" " + order10 + b" \n", b" " + half + b" \n")
        guest.send(f"mask /proc/buddyinfo {too_few}")
        problem = await reader.read(RAM)
        assert isinstance(problem, AgentProblem) and problem.kind == "rejected", problem
        assert "but meminfo says MemFree" in problem.reason
        guest.send("unmask /proc/buddyinfo")
        assert isinstance(await reader.read(RAM), FreeLists)
    finally:
        await reader.close()


async def test_a_blocked_agent_says_so(guest_image: GuestImage, tmp_path: Path) -> None:
    spec = QemuGuestSpec(name="blocked", ram_bytes=RAM_MIB << 20, agent_block_rpcs=RHEL_BLOCKED)
    with launch(spec, guest_image, tmp_path / "blocked") as blocked:
        await asyncio.to_thread(wait_guest_ready, blocked)
        assert f"blocked={','.join(RHEL_BLOCKED)}" in blocked.console()
        assert blocked.agent_path is not None
        reader = AgentReader(SocketTransport(blocked.agent_path, connect_timeout=CONNECT_TIMEOUT))
        try:
            problem = await reader.read(RAM)
            assert isinstance(problem, AgentProblem) and problem.kind == "blocked"
            assert problem.reason.startswith(
                "the agent does not allow guest-file-open, guest-file-read (guest-info)"
            )
            assert problem.retry_at - problem.at == ReaderConfig().blocked_recheck
            assert await reader.read(RAM) is problem  # no retry loop
            assert reader.info is None  # forgotten: asked again at the recheck
        finally:
            await reader.close()
