"""Balloon safety: no target below what the guest uses plus the margin, unless forced."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from api.app import create_app
from daemon.config import Address, Settings, VMConfig
from daemon.guest_stats import GuestStats
from daemon.service import Reclaimd
from tests.qmp.fake_qmp import FakeVM
from tests.qmp.test_session import eventually

TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 1024 * 1024
URL = "/api/v1/vms/vm1/balloon"
# The fake guest: 512 MiB of RAM, total 490 MiB, available 350 MiB: 140 MiB used; the margin
# is 64 MiB (5 % of 512 MiB is less), so the floor is 204 MiB.
FLOOR = 140 * MiB + 64 * MiB


async def _daemon(settings: Settings, fake_qmp: Any, vm: FakeVM) -> Reclaimd:
    daemon = Reclaimd(settings.model_copy(update={"token": SecretStr(TOKEN)}), host_view=False)
    await daemon.start()
    server = await fake_qmp(vm=vm)
    state = daemon.add_vm("vm1", Address("unix", path=str(server.path)))
    await eventually(lambda: state.up and state.guest_stats is not None)
    return daemon


@pytest.fixture
async def client(settings: Settings, fake_qmp: Any) -> AsyncIterator[httpx.AsyncClient]:
    daemon = await _daemon(settings, fake_qmp, FakeVM(name="vm1"))
    transport = httpx.ASGITransport(app=create_app(daemon.settings, daemon))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        c.daemon = daemon  # type: ignore[attr-defined]
        yield c
    await daemon.stop()


async def test_targets_below_used_memory_plus_margin_are_refused_unless_forced(
    client: httpx.AsyncClient,
) -> None:
    for target in (1, 47 * MiB, FLOOR - 1):
        reply = await client.post(URL, json={"target_bytes": target}, headers=AUTH)
        assert reply.status_code == 422, reply.text
        detail = reply.json()["detail"]
        assert "used memory (146800640 bytes (140 MiB)) plus the margin" in detail
        assert "force" in detail
    assert (await client.post(URL, json={"target_bytes": FLOOR}, headers=AUTH)).status_code == 202
    forced = await client.post(URL, json={"target_bytes": 1, "force": True}, headers=AUTH)
    assert forced.status_code == 202, forced.text
    events = (await client.get("/api/v1/vms/vm1/events")).json()["events"]
    requests = [e["data"] for e in events if e["kind"] == "request"]
    assert requests[0] == {
        "target_bytes": 1,
        "requester": "token",
        "force": True,
        "floor_bytes": FLOOR,
    }
    assert requests[1] == {"target_bytes": FLOOR, "requester": "token"}


@pytest.mark.parametrize(
    "body",
    [
        {"target_bytes": True},
        {"target_bytes": 300.0 * MiB},
        {"target_bytes": str(300 * MiB)},
        {"target_bytes": 300 * MiB, "force": "yes"},
        {"target_bytes": 300 * MiB, "force": 1},
    ],
)
async def test_only_integers_and_booleans_are_taken(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    reply = await client.post(URL, json=body, headers=AUTH)
    assert reply.status_code == 422, reply.text


async def test_the_service_refuses_a_bool_whoever_calls_it(client: httpx.AsyncClient) -> None:
    daemon: Reclaimd = client.daemon  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="must be an integer"):
        await daemon.set_balloon("vm1", True, requester="test")


async def test_without_guest_stats_the_configured_minimum_is_the_floor(
    settings: Settings, fake_qmp: Any
) -> None:
    quiet = FakeVM(name="vm1", stats_updated=False)  # no balloon driver: no statistics
    daemon = await _daemon(settings, fake_qmp, quiet)
    try:
        with pytest.raises(ValueError, match="no balloon_min_bytes is configured"):
            await daemon.set_balloon("vm1", 400 * MiB, requester="test")
        await daemon.set_balloon("vm1", 400 * MiB, requester="test", force=True)
    finally:
        await daemon.stop()
    for update, floor in (
        ({"balloon_min_bytes": 256 * MiB}, 256 * MiB),
        (  # the VM's own setting takes precedence
            {
                "balloon_min_bytes": 256 * MiB,
                "vm": [VMConfig(name="vm1", address="unix:/x", balloon_min_bytes=300 * MiB)],
            },
            300 * MiB,
        ),
    ):
        daemon = await _daemon(settings.model_copy(update=update), fake_qmp, quiet)
        try:
            with pytest.raises(ValueError, match="configured minimum"):
                await daemon.set_balloon("vm1", floor - 1, requester="test")
            await daemon.set_balloon("vm1", floor, requester="test")
        finally:
            await daemon.stop()


def test_the_floor_from_stats_and_its_exceptions(settings: Settings) -> None:
    daemon = Reclaimd(settings, host_view=False)
    vm = daemon.fleet.add("vm", "unix:/x", "connect")
    vm.memory.base_bytes = 4096 * MiB
    now = time.time()
    stats = GuestStats(last_update=now, total_bytes=4000 * MiB, available_bytes=1000 * MiB)
    vm.guest_stats = stats
    margin = 4096 * MiB // 20  # 5 % of RAM: above 64 MiB
    assert daemon.balloon_floor(vm)[0] == 3000 * MiB + margin
    # deflate-on-oom: the guest counts the balloon's pages as used; they are not the guest's.
    vm.balloon.deflate_on_oom, vm.balloon.actual_bytes = True, 3096 * MiB
    assert daemon.balloon_floor(vm)[0] == 2000 * MiB + margin
    # Statistics a minute old, or rejected ones, say nothing about now.
    vm.guest_stats = GuestStats(last_update=now - 120, total_bytes=1, available_bytes=1)
    floor, how = daemon.balloon_floor(vm)
    assert floor is None and "120 s old" in how
    vm.guest_stats = GuestStats(valid=False, problems=("free > total",))
    vm.guest_stats_error = "rejected: free > total"
    assert daemon.balloon_floor(vm) == (
        None,
        "rejected: free > total, and no balloon_min_bytes is configured",
    )
