"""The QMP commands a simulated guest answers, with QEMU 7.2's arguments and replies.

These are the commands reclaimd uses plus the lifecycle commands that produce the events it
follows. Anything else is ``CommandNotFound``, as for a QEMU built without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemon.simguest.machine import Machine
from daemon.simguest.schema import Param, check

Handler = Callable[[Machine, dict[str, Any]], Any]

_PATH = Param("path", "str")
_PROPERTY = Param("property", "str")


def _version(m: Machine, _: dict[str, Any]) -> Any:
    major, minor, micro = m.config.version
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": m.config.package}


def _status(m: Machine, _: dict[str, Any]) -> Any:
    return {"status": m.status, "singlestep": False, "running": m.running}


def _balloon(m: Machine, args: dict[str, Any]) -> Any:
    m.balloon.set_target(args["value"])
    return {}


def _qom_get(m: Machine, args: dict[str, Any]) -> Any:
    return m.qom.resolve(args["path"]).get(args["property"])


def _qom_set(m: Machine, args: dict[str, Any]) -> Any:
    m.qom.resolve(args["path"]).set(args["property"], args["value"])
    return {}


def _stop(m: Machine, _: dict[str, Any]) -> Any:
    m.stop()
    return {}


def _cont(m: Machine, _: dict[str, Any]) -> Any:
    m.cont()
    return {}


def _reset(m: Machine, _: dict[str, Any]) -> Any:
    m.reset(guest=False, reason="host-qmp-system-reset")
    return {}


def _powerdown(m: Machine, _: dict[str, Any]) -> Any:
    m.powerdown()
    return {}


def _quit(m: Machine, _: dict[str, Any]) -> Any:
    m.shutdown(guest=False, reason="host-qmp-quit")
    return {}


COMMANDS: dict[str, tuple[tuple[Param, ...], Handler]] = {
    "query-version": ((), _version),
    "query-name": ((), lambda m, _: {"name": m.config.name}),
    "query-uuid": ((), lambda m, _: {"UUID": m.config.uuid}),
    "query-status": ((), _status),
    "query-balloon": ((), lambda m, _: m.balloon.query()),
    "balloon": ((Param("value", "int"),), _balloon),
    "query-memory-size-summary": (
        (),
        lambda m, _: {"base-memory": m.config.ram_bytes, "plugged-memory": 0},
    ),
    "query-memory-devices": ((), lambda m, _: []),
    "query-memdev": ((), lambda m, _: [m.memdev()]),
    "x-query-ramblock": ((), lambda m, _: {"human-readable-text": m.ramblock_text()}),
    "qom-list": ((_PATH,), lambda m, args: m.qom.resolve(args["path"]).listing()),
    "qom-get": ((_PATH, _PROPERTY), _qom_get),
    "qom-set": ((_PATH, _PROPERTY, Param("value", "any")), _qom_set),
    "stop": ((), _stop),
    "cont": ((), _cont),
    "system_reset": ((), _reset),
    "system_powerdown": ((), _powerdown),
    "quit": ((), _quit),
}


class MachineCommands:
    """The command table bound to one machine (satisfies ``monitor.Commands``)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def knows(self, name: str) -> bool:
        return name in COMMANDS

    def execute(self, name: str, arguments: dict[str, Any]) -> Any:
        params, handler = COMMANDS[name]
        return handler(self.machine, check(arguments, params))
