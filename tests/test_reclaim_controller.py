"""The reclaim controller in the daemon, on a simulated guest over QMP with its agent: advice
from the real poll cycle, steps in ``act`` mode, each journalled with its reason and inputs;
nothing moves in ``advise`` mode."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.config import Address, Settings, VMConfig
from daemon.fleet import VMOptions
from daemon.instruments import RECLAIM_ACTIONS
from daemon.service import Reclaimd
from daemon.simguest.guest import SimGuest, SimGuestSpec
from daemon.simguest.process import default_guest_os
from tests.qmp.test_session import eventually

MiB = 1 << 20
RAM = 256 * MiB


@pytest.fixture
async def guest(sockdir: Path) -> AsyncIterator[SimGuest]:
    # The page cache grows all the time: memory a balloon can take and reporting cannot.
    spec = SimGuestSpec(
        name="rc", ram_bytes=RAM, socket=sockdir / "rc.qmp", workload="pagecache", time_scale=4
    )
    g = SimGuest(spec, default_guest_os())
    await g.start()
    try:
        yield g
    finally:
        await g.close()


def reclaim_settings(settings: Settings, mode: str) -> Settings:
    return settings.model_copy(
        update={
            "reclaim": mode,
            "reclaim_host_target": 0.0,  # the host goal is always met: the guest decides
            "reclaim_cooldown": 1.0,
            "reclaim_step_bytes": 32 * MiB,
            "poll_interval": 0.5,
            "stats_interval": 1,
        }
    )


def controller_steps(daemon: Reclaimd) -> list[dict[str, object]]:
    assert daemon.journal is not None
    entries = daemon.journal.entries("rc", since=None, before_id=None, limit=1000)
    return [
        e.data
        for e in entries
        if e.kind == "request" and (e.data or {}).get("requester") == "reclaim-controller"
    ]


async def test_act_inflates_in_bounded_steps_to_the_advice_and_journals_each(
    settings: Settings, guest: SimGuest
) -> None:
    daemon = Reclaimd(reclaim_settings(settings, "act"))
    await daemon.start()
    try:
        assert guest.spec.socket is not None
        vm = daemon.add_vm("rc", Address("unix", path=str(guest.spec.socket)))
        before = RECLAIM_ACTIONS.labels("inflate", "advice")._value.get()

        # Two steps: two inflations, or one the squeezed guest answered with pressure.
        await eventually(lambda: len(controller_steps(daemon)) >= 2, 60)
        steps = controller_steps(daemon)
        inflations = [s for s in steps if s["action"] == "inflate"]
        assert inflations, steps
        for step in steps:
            actual, target = step["actual_bytes"], step["target_bytes"]
            assert isinstance(actual, int) and isinstance(target, int)
            if step["action"] == "deflate":
                # The squeezed cache made the guest fault: the controller gave memory back.
                assert step["reason"] in ("pressure", "near_margin")
                assert target > actual
                continue
            assert step["action"] == "inflate" and step["reason"] == "advice"
            assert 0 < actual - target <= 32 * MiB  # bounded
            assert step["expected_gain_bytes"] is not None
            assert step["pressure"] == []
        assert vm.advice is not None and vm.advice.floor_bytes is not None
        assert vm.balloon.target_bytes is not None
        assert vm.balloon.target_bytes >= vm.advice.floor_bytes
        counted = RECLAIM_ACTIONS.labels("inflate", "advice")._value.get()
        assert counted >= before + len(inflations)
        # The guest's balloon followed: QEMU reported it smaller than the RAM.
        await eventually(lambda: min(balloon_actuals(daemon), default=RAM) < RAM, 10)
    finally:
        await daemon.stop()


def balloon_actuals(daemon: Reclaimd) -> list[int]:
    assert daemon.journal is not None
    entries = daemon.journal.entries("rc", since=None, before_id=None, limit=1000)
    return [
        int(e.data["actual"])
        for e in entries
        if e.kind == "event" and e.name == "BALLOON_CHANGE" and "actual" in (e.data or {})
    ]


async def test_advise_only_logs_what_it_would_do(
    settings: Settings, guest: SimGuest, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Reclaimd(reclaim_settings(settings, "advise"))
    await daemon.start()
    caplog.set_level(logging.INFO, logger="daemon.service")
    try:
        assert guest.spec.socket is not None
        vm = daemon.add_vm("rc", Address("unix", path=str(guest.spec.socket)))
        await eventually(
            lambda: "reclaim (advise, not acting): would inflate rc" in caplog.text, 60
        )
        assert controller_steps(daemon) == []
        assert vm.balloon.target_bytes is None
        assert guest.machine.balloon.target_bytes == RAM
    finally:
        await daemon.stop()


async def test_a_vm_opted_out_in_the_config_is_left_alone_and_keeps_its_minimum(
    settings: Settings, guest: SimGuest
) -> None:
    assert guest.spec.socket is not None
    configured = VMConfig(
        name="rc", address=f"unix:{guest.spec.socket}", reclaim=False, balloon_min_bytes=128 * MiB
    )
    daemon = Reclaimd(reclaim_settings(settings, "act").model_copy(update={"vm": [configured]}))
    await daemon.start()
    try:
        vm = daemon.fleet.get("rc")
        assert vm is not None
        assert vm.options == VMOptions(False, 128 * MiB, "config")
        # The advice is given all the same, above the VM's own minimum, and says inflate.
        await eventually(
            lambda: (
                vm.advice is not None
                and vm.advice.target_bytes is not None
                and vm.advice.target_bytes < RAM - 32 * MiB
            ),
            60,
        )
        assert vm.advice is not None and vm.advice.floor_bytes is not None
        assert vm.advice.floor_bytes >= 128 * MiB
        assert await daemon.reclaim_once(host_use=1.0) == []
        # The same VM without the opt-out is stepped towards the advice.
        vm.options = VMOptions()
        decisions = await daemon.reclaim_once(host_use=1.0)
        assert [(d.vm, d.action) for d in decisions] == [("rc", "inflate")]
    finally:
        await daemon.stop()
