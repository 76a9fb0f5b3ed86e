"""``/readyz``: ready once the daemon has started and each VM's first attach attempt is made."""

from __future__ import annotations

from typing import Any

import httpx

from api.app import create_app
from daemon.config import Address, Settings
from daemon.fleet import SessionState
from daemon.service import Reclaimd
from tests.qmp.fake_qmp import Behaviour
from tests.qmp.test_session import eventually


def client_of(daemon: Reclaimd) -> httpx.AsyncClient:
    app = create_app(daemon.settings, daemon)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_not_ready_before_the_daemon_starts(settings: Settings) -> None:
    async with client_of(Reclaimd(settings)) as client:
        reply = await client.get("/readyz")
        live = await client.get("/healthz")
    assert reply.status_code == 503
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["detail"] == "the daemon is starting"
    assert live.status_code == 200  # alive all the same: not a reason to restart it


async def test_ready_once_every_vm_had_its_first_attempt_and_then_stays_ready(
    settings: Settings, fake_qmp: Any
) -> None:
    # A QEMU that never greets: the first attempt ends only at the connect timeout (1 s).
    silent = await fake_qmp("silent", behaviour=Behaviour(greet=False))
    daemon = Reclaimd(settings)
    await daemon.start()
    try:
        vm = daemon.add_vm("silent", Address("unix", path=str(silent.path)))
        async with client_of(daemon) as client:
            waiting = await client.get("/readyz")
            assert waiting.status_code == 503, waiting.text
            assert waiting.json()["detail"] == (
                "waiting for the first attach attempt of 1 VMs: silent"
            )
            await eventually(lambda: vm.session_state != SessionState.CONNECTING, timeout=5)
            await eventually(lambda: vm.last_error is not None, timeout=5)
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json() == {"status": "ready", "vms": 1, "vms_up": 0}
            # It tries again and again: readiness does not flap with it.
            await eventually(lambda: vm.session_state == SessionState.CONNECTING, timeout=5)
            assert (await client.get("/readyz")).status_code == 200
    finally:
        await daemon.stop()
