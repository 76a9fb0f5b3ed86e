"""The REST API and /metrics over a daemon attached to fake QMP servers at the socket seam."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from api.app import create_app
from daemon.config import Address, Settings
from daemon.service import Reclaimd
from tests.qmp.fake_qmp import Behaviour, FakeVM
from tests.qmp.test_session import eventually

TOKEN = "s3cret-token-0123456789"
MiB = 1024 * 1024


@pytest.fixture
async def daemon(settings: Settings) -> AsyncIterator[Reclaimd]:
    d = Reclaimd(settings.model_copy(update={"token": SecretStr(TOKEN)}))
    await d.start()
    yield d
    await d.stop()


@pytest.fixture
async def client(daemon: Reclaimd) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(daemon.settings, daemon)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def attach(daemon: Reclaimd, server: Any, name: str = "vm1") -> None:
    vm = daemon.add_vm(name, Address("unix", path=str(server.path)))
    await eventually(lambda: vm.up and vm.guest_stats is not None)


async def test_healthz(client: httpx.AsyncClient) -> None:
    reply = await client.get("/healthz")
    assert reply.status_code == 200
    assert reply.json()["status"] == "ok"


async def test_vm_list_and_detail(
    client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    await attach(daemon, server)
    listing = (await client.get("/api/v1/vms")).json()["vms"]
    assert [vm["name"] for vm in listing] == ["vm1"]
    detail = (await client.get("/api/v1/vms/vm1")).json()
    assert detail["qemu_version"] == "7.2.22"
    assert detail["memory"]["ram_bytes"] == 512 * MiB
    assert detail["balloon"]["actual_bytes"] == 512 * MiB
    assert detail["guest_stats"]["free_bytes"] == server.vm.free
    assert 0 <= detail["guest_stats"]["age_seconds"] < 5


async def test_unknown_vm_is_404_json(client: httpx.AsyncClient) -> None:
    reply = await client.get("/api/v1/vms/nope")
    assert reply.status_code == 404
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "no VM named 'nope'",
        "instance": "/api/v1/vms/nope",
    }
    assert (await client.get("/api/v1/vms/nope/events")).status_code == 404


async def test_bad_query_is_422(client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any) -> None:
    await attach(daemon, await fake_qmp())
    reply = await client.get("/api/v1/vms/vm1/events", params={"limit": 0})
    assert reply.status_code == 422
    assert "limit" in reply.json()["detail"]


async def test_rejected_stats_are_not_served(
    client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any
) -> None:
    server = await fake_qmp(vm=FakeVM(free=2000 * MiB, total=400 * MiB))
    vm = daemon.add_vm("vm1", Address("unix", path=str(server.path)))
    await eventually(lambda: vm.guest_stats is not None)
    stats = (await client.get("/api/v1/vms/vm1")).json()["guest_stats"]
    assert stats["valid"] is False and stats["free_bytes"] is None and stats["problems"]
    metrics = (await client.get("/metrics")).text
    assert 'qemu_guest_stats_valid{vm="vm1"} 0.0' in metrics
    assert "qemu_guest_memory_free_bytes{" not in metrics


async def test_balloon_needs_a_configured_token(settings: Settings, fake_qmp: Any) -> None:
    daemon = Reclaimd(settings)  # no token configured
    await daemon.start()
    try:
        await attach(daemon, await fake_qmp())
        app = create_app(settings, daemon)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            reply = await c.post(
                "/api/v1/vms/vm1/balloon",
                json={"target_bytes": 300 * MiB},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        assert reply.status_code == 403
        assert "disabled" in reply.json()["detail"]
    finally:
        await daemon.stop()


async def test_balloon_token_and_bounds(
    client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any
) -> None:
    server = await fake_qmp(behaviour=Behaviour(balloon_step=64 * MiB))
    await attach(daemon, server)
    url = "/api/v1/vms/vm1/balloon"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.post(url, json={"target_bytes": 300 * MiB})).status_code == 401
    wrong = {"Authorization": "Bearer wrong-token-0123456789"}
    assert (
        await client.post(url, json={"target_bytes": 300 * MiB}, headers=wrong)
    ).status_code == 401
    too_big = await client.post(url, json={"target_bytes": 4096 * MiB}, headers=auth)
    assert too_big.status_code == 422 and "exceeds" in too_big.json()["detail"]
    assert (await client.post(url, json={"target_bytes": -1}, headers=auth)).status_code == 422
    assert (await client.post(url, json={"target": "x"}, headers=auth)).status_code == 422
    assert "balloon" not in server.commands

    ok = await client.post(url, json={"target_bytes": 300 * MiB}, headers=auth)
    assert ok.status_code == 202
    await eventually(lambda: daemon.fleet.get("vm1").balloon.actual_bytes == 300 * MiB)  # type: ignore[union-attr]
    events = (await client.get("/api/v1/vms/vm1/events")).json()["events"]
    names = [(e["kind"], e["name"]) for e in events]
    assert ("event", "BALLOON_CHANGE") in names and ("request", "balloon") in names
    metrics = (await client.get("/metrics")).text
    assert 'qemu_balloon_target_bytes{vm="vm1"} 3.145728e+08' in metrics
    assert 'qemu_balloon_actual_bytes{vm="vm1"} 3.145728e+08' in metrics
    assert 'qemu_events_total{event="BALLOON_CHANGE",vm="vm1"} 4.0' in metrics


async def test_events_paging_newest_first(
    client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any
) -> None:
    server = await fake_qmp()
    await attach(daemon, server)
    for i in range(5):
        await server.emit("BALLOON_CHANGE", {"actual": (500 - i) * MiB})
    vm = daemon.fleet.get("vm1")
    await eventually(lambda: vm is not None and vm.event_counts.get("BALLOON_CHANGE") == 5)
    first = (await client.get("/api/v1/vms/vm1/events", params={"limit": 3})).json()
    ids = [e["id"] for e in first["events"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == 3
    rest = (
        await client.get(
            "/api/v1/vms/vm1/events", params={"limit": 10, "before_id": first["next_before_id"]}
        )
    ).json()
    assert all(e["id"] < ids[-1] for e in rest["events"])
    assert rest["next_before_id"] is None
    total = len(first["events"]) + len(rest["events"])
    assert total == 6  # attach + 5 events
    future = (await client.get("/api/v1/vms/vm1/events", params={"since": 4e9})).json()
    assert future["events"] == []


async def test_metrics_follow_the_fleet(
    client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any
) -> None:
    await attach(daemon, await fake_qmp())
    text = (await client.get("/metrics")).text
    assert 'qemu_vm_up{vm="vm1"} 1.0' in text
    assert (
        'qemu_vm_info{attach="connect",qemu_version="7.2.22",'
        'uuid="5f1d9f5c-1111-4222-8333-444455556666",vm="vm1"} 1.0' in text
    )
    assert "reclaimd_build_info{" in text
    assert 'reclaimd_qmp_commands_total{command="query-balloon",outcome="ok"}' in text
    daemon.remove_vm("vm1")
    await asyncio.sleep(0)
    text = (await client.get("/metrics")).text
    assert 'vm="vm1"' not in text.split("reclaimd_qmp_reconnects")[0]


async def test_journal_survives_restart(settings: Settings, fake_qmp: Any, sockdir: Path) -> None:
    server = await fake_qmp()
    first = Reclaimd(settings)
    await first.start()
    await attach(first, server)
    await server.emit("RESET")
    await eventually(lambda: first.fleet.get("vm1").event_counts.get("RESET") == 1)  # type: ignore[union-attr]
    await first.stop()

    second = Reclaimd(settings)
    await second.start()
    try:
        vm = second.add_vm("vm1", Address("unix", path=str(server.path)))
        assert vm.event_counts.get("RESET") == 1
        assert second.journal is not None
        kinds = [e.name for e in second.journal.entries("vm1")]
        assert "RESET" in kinds and "attach" in kinds and "detach" in kinds
    finally:
        await second.stop()


async def test_broken_monitors_never_delay_the_api_or_other_vms(
    client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any
) -> None:
    broken = {
        "silent": Behaviour(greet=False),
        "mute": Behaviour(answer=False),
        "garbage": Behaviour(garbage_after="query-name"),
        "huge": Behaviour(huge_line_after="query-status"),
        "hangup": Behaviour(hangup_on="query-memory-size-summary"),
    }
    for name, behaviour in broken.items():
        server = await fake_qmp(name, behaviour=behaviour)
        daemon.add_vm(name, Address("unix", path=str(server.path)))
    healthy = await fake_qmp("healthy")
    await attach(daemon, healthy, "healthy")
    vm = daemon.fleet.get("healthy")
    assert vm is not None and vm.last_poll is not None
    first_poll = vm.last_poll
    slowest = 0.0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while loop.time() < deadline:
        started = loop.time()
        assert (await client.get("/api/v1/vms")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        slowest = max(slowest, loop.time() - started)
        await asyncio.sleep(0.05)
    assert slowest < 0.5, f"a request took {slowest:.3f} s"
    assert vm.up and (vm.last_poll or 0) > first_poll + 1
    for name in broken:
        state = daemon.fleet.get(name)
        assert state is not None and not state.up, name
        assert state.last_error, name


async def test_estimate_and_ranges_say_why_without_a_host_view(
    client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any
) -> None:
    # A QEMU without x-query-ramblock (before 6.2): the host cannot locate guest RAM.
    await attach(daemon, await fake_qmp(behaviour=Behaviour(lacks=frozenset({"x-query-ramblock"}))))
    await eventually(lambda: daemon.fleet.get("vm1").estimate is not None)  # type: ignore[union-attr]
    estimate = (await client.get("/api/v1/vms/vm1/estimate")).json()["estimate"]
    components = estimate["components"]
    assert components["ballooned"]["bytes"] == 0
    assert components["reported"]["bytes"] is None
    assert "x-query-ramblock" in components["reported"]["reason"]
    what_if = (await client.get("/api/v1/vms/vm1/estimate", params={"order": 5})).json()
    assert what_if["what_if"]["order"] == 5 and what_if["what_if"]["extra_reportable_bytes"] is None
    assert (await client.get("/api/v1/vms/vm1/estimate", params={"order": 11})).status_code == 422
    ranges = (await client.get("/api/v1/vms/vm1/reported-ranges")).json()
    assert ranges["ranges"] == [] and "x-query-ramblock" in ranges["problem"]
    text = (await client.get("/metrics")).text
    assert 'qemu_returned_bytes{part="ballooned",vm="vm1"} 0.0' in text
    assert 'part="reported"' not in text  # unknown is absent, never a made-up 0


async def test_advice_says_why_there_is_none_and_404s_an_unknown_vm(
    client: httpx.AsyncClient, daemon: Reclaimd, fake_qmp: Any
) -> None:
    await attach(daemon, await fake_qmp(behaviour=Behaviour(lacks=frozenset({"x-query-ramblock"}))))
    await eventually(lambda: daemon.fleet.get("vm1").advice is not None)  # type: ignore[union-attr]
    advice = (await client.get("/api/v1/vms/vm1/advice")).json()
    assert advice["vm"] == "vm1"
    assert advice["target_bytes"] is None and advice["action"] == "none"
    assert advice["expected_gain_bytes"] == 0
    assert advice["reasons"] and "x-query-ramblock" in advice["reasons"][0]
    assert advice["pressure"]["signals"] == []
    assert "qemu_balloon_recommended_bytes{" not in (await client.get("/metrics")).text
    missing = await client.get("/api/v1/vms/nope/advice")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
