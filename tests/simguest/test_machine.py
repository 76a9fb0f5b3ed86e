"""The machine, its balloon device and QOM tree, driven directly (no sockets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from daemon.guest_stats import GuestStats
from daemon.host.ramblocks import parse_ramblocks
from daemon.simguest.balloon import STAT_NAMES, UNAVAILABLE
from daemon.simguest.commands import MachineCommands
from daemon.simguest.events import EventBus
from daemon.simguest.machine import Machine, MachineConfig, VirtualClock
from daemon.simguest.wire import QMPError

MiB = 1 << 20
BALLOON = "/machine/peripheral/balloon0"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class NoTimer:
    def cancel(self) -> None:
        pass


def make(
    ram: int = 256 * MiB, *, start_paused: bool = False
) -> tuple[Machine, MachineCommands, Clock, list[dict[str, Any]]]:
    clock = Clock()
    seen: list[dict[str, Any]] = []

    def schedule(_delay: float, _fn: Callable[[], None]) -> NoTimer:
        return NoTimer()  # events are never held long enough to matter here

    bus = EventBus(schedule=schedule, clock=clock, throttle={})
    bus.sinks.append(seen.append)
    machine = Machine(
        MachineConfig(name="vm1", ram_bytes=ram, uuid="u-1"),
        bus,
        clock=VirtualClock(clock),
        wall_clock=lambda: 1_700_000_000.9,
        start_paused=start_paused,
    )
    return machine, MachineCommands(machine), clock, seen


def names(seen: list[dict[str, Any]]) -> list[str]:
    return [m["event"] for m in seen]


def test_balloon_target_is_clamped_to_ram_and_actual_follows_the_guest() -> None:
    machine, cmds, _, seen = make()
    cmds.execute("balloon", {"value": 10 * 256 * MiB})
    assert machine.balloon.num_pages == 0
    cmds.execute("balloon", {"value": 192 * MiB})
    assert machine.balloon.num_pages == (64 * MiB) >> 12
    assert cmds.execute("query-balloon", {}) == {"actual": 256 * MiB}  # no driver moved yet
    machine.balloon.guest_set_actual(1024)
    machine.balloon.guest_set_actual(1024)  # unchanged: no second event
    assert cmds.execute("query-balloon", {}) == {"actual": 252 * MiB}
    assert seen == [
        {
            "timestamp": {"seconds": 100, "microseconds": 0},
            "event": "BALLOON_CHANGE",
            "data": {"actual": 252 * MiB},
        }
    ]


@pytest.mark.parametrize("value", [0, -1])
def test_balloon_refuses_non_positive_targets(value: int) -> None:
    _, cmds, _, _ = make()
    with pytest.raises(QMPError) as info:
        cmds.execute("balloon", {"value": value})
    assert (info.value.error_class, info.value.desc) == (
        "GenericError",
        "Parameter 'target' expects a size",
    )


def test_guest_stats_are_unavailable_until_the_guest_pushes_them() -> None:
    machine, cmds, _, _ = make()
    before = cmds.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
    assert before == {"stats": dict.fromkeys(STAT_NAMES, UNAVAILABLE), "last-update": 0}
    pushed = GuestStats(free_bytes=5, oom_kills=1, unknown={"stat-bogus": 1})
    machine.balloon.receive_stats(pushed, now=0.0)
    after = cmds.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
    assert after["last-update"] == 1_700_000_000
    assert after["stats"]["stat-free-memory"] == 5
    # Stats the guest did not send are reset to "unavailable", as QEMU does on every push;
    # what QEMU 7.2 does not know is never shown.
    assert after["stats"]["stat-total-memory"] == UNAVAILABLE
    assert list(after["stats"]) == list(STAT_NAMES)


def test_stats_polling_timer_fires_at_once_then_one_interval_after_each_push() -> None:
    machine, cmds, clock, _ = make()
    balloon = machine.balloon
    assert not balloon.stats_request_due(machine.clock.now())
    cmds.execute(
        "qom-set", {"path": BALLOON, "property": "guest-stats-polling-interval", "value": 2}
    )
    assert balloon.stats_request_due(machine.clock.now())
    balloon.stats_requested()
    balloon.receive_stats(GuestStats(), machine.clock.now())
    assert not balloon.stats_request_due(machine.clock.now())
    clock.t += 1.9
    assert not balloon.stats_request_due(machine.clock.now())
    clock.t += 0.1
    assert balloon.stats_request_due(machine.clock.now())
    # The timer runs on the virtual clock: a paused VM is never asked.
    balloon.stats_requested()
    balloon.receive_stats(GuestStats(), machine.clock.now())
    machine.stop()
    clock.t += 10
    assert not balloon.stats_request_due(machine.clock.now())
    machine.cont()
    clock.t += 2
    assert balloon.stats_request_due(machine.clock.now())
    cmds.execute(
        "qom-set", {"path": BALLOON, "property": "guest-stats-polling-interval", "value": 0}
    )
    assert not balloon.stats_request_due(machine.clock.now() + 100)


def test_lifecycle_events_and_states() -> None:
    machine, cmds, _, seen = make()
    exits: list[bool] = []
    machine.on_exit = lambda: exits.append(True)
    assert cmds.execute("query-status", {}) == {
        "status": "running",
        "singlestep": False,
        "running": True,
    }
    cmds.execute("stop", {})
    cmds.execute("stop", {})
    assert cmds.execute("query-status", {})["status"] == "paused"
    cmds.execute("cont", {})
    cmds.execute("system_reset", {})
    cmds.execute("system_powerdown", {})  # the default ``defer`` runs the guest at once
    assert names(seen) == ["STOP", "RESUME", "RESET", "POWERDOWN", "SHUTDOWN"]
    assert seen[2]["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    assert seen[4]["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert exits == [True]


def test_prelaunch_waits_for_cont_and_ignores_stop() -> None:
    machine, cmds, _, seen = make(start_paused=True)
    started: list[bool] = []
    machine.on_start = lambda: started.append(True)
    cmds.execute("stop", {})
    assert cmds.execute("query-status", {})["status"] == "prelaunch"
    cmds.execute("cont", {})
    cmds.execute("stop", {})
    cmds.execute("cont", {})
    assert names(seen) == ["RESUME", "STOP", "RESUME"]
    assert started == [True]


def test_quit_announces_a_host_shutdown() -> None:
    machine, cmds, _, seen = make()
    exits: list[bool] = []
    machine.on_exit = lambda: exits.append(True)
    cmds.execute("quit", {})
    assert seen[-1]["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert exits == [True]


def test_ramblock_table_parses_with_the_host_views_parser() -> None:
    _, cmds, _, _ = make(ram=64 * MiB)
    text = cmds.execute("x-query-ramblock", {})["human-readable-text"]
    blocks = {b.name: b for b in parse_ramblocks(text)}
    assert blocks["ram0"].total == blocks["ram0"].used == 64 * MiB
    assert blocks["ram0"].page_size == 4096
    assert blocks["pc.bios"].offset == 64 * MiB
    assert cmds.execute("query-memdev", {})[0]["size"] == 64 * MiB


def test_qom_partial_paths_and_children() -> None:
    _, cmds, _, _ = make()
    assert cmds.execute("qom-get", {"path": "balloon0", "property": "type"}) == (
        "virtio-balloon-pci"
    )
    assert cmds.execute("qom-get", {"path": "virtio-backend", "property": "type"}) == (
        "virtio-balloon-device"
    )
    listing = cmds.execute("qom-list", {"path": "/machine/peripheral"})
    assert {"name": "balloon0", "type": "child<virtio-balloon-pci>"} in listing
    with pytest.raises(QMPError) as info:
        cmds.execute("qom-get", {"path": "nowhere", "property": "type"})
    assert info.value.error_class == "DeviceNotFound"


def test_virtual_clock_stands_still_while_paused() -> None:
    source = Clock()
    clock = VirtualClock(source)
    source.t += 5
    assert clock.now() == 5
    clock.pause()
    source.t += 10
    assert clock.now() == 5
    clock.resume()
    source.t += 1
    assert clock.now() == 6


def test_without_a_driver_the_stats_timer_just_rearms() -> None:
    machine, cmds, _, _ = make()
    balloon = machine.balloon
    cmds.execute(
        "qom-set", {"path": BALLOON, "property": "guest-stats-polling-interval", "value": 5}
    )
    assert balloon.stats_request_due(machine.clock.now())
    balloon.no_driver(machine.clock.now())
    assert balloon.next_poll == machine.clock.now() + 5
    assert balloon.guest_stats()["last-update"] == 0
