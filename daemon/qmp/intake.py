"""QMP events into the journal and the fleet state.

Events are applied at once to what they describe (balloon size, run state). Anything that needs
a follow-up query is flagged in ``Followups`` for the session's poll loop, so the event pump never
waits on a command.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.fleet import VMState
from daemon.instruments import JOURNAL_ERRORS
from daemon.journal import Journal, JournalError, qmp_timestamp

log = logging.getLogger(__name__)

# The events reclaimd follows. Others are journalled too: a VM's history should be complete.
FOLLOWED_EVENTS = frozenset(
    {
        "BALLOON_CHANGE",
        "MEMORY_DEVICE_SIZE_CHANGE",
        "DEVICE_DELETED",
        "SHUTDOWN",
        "POWERDOWN",
        "RESET",
        "STOP",
        "RESUME",
        "MEMORY_FAILURE",
    }
)

# Run states the lifecycle events imply, so the state is right before the next query-status.
_STATUS_AFTER = {
    "STOP": ("paused", False),
    "RESUME": ("running", True),
    "SHUTDOWN": ("shutdown", False),
}


@dataclass
class Followups:
    """Queries an event asks the poll loop to make."""

    memory: bool = False
    status: bool = False

    def any(self) -> bool:
        return self.memory or self.status


def record(
    journal: Journal,
    vm: str,
    kind: str,
    name: str,
    data: Mapping[str, Any] | None = None,
    qemu_time: float | None = None,
) -> None:
    """Journal one entry. A journal that fails (disk full) is logged and counted, never fatal:
    the session goes on following its VM."""
    try:
        journal.append(vm, kind, name, data, qemu_time=qemu_time)
    except JournalError as exc:
        JOURNAL_ERRORS.inc()
        log.error("journal: cannot record %s %s of %s: %s", kind, name, vm, exc)


def apply_event(
    vm: VMState, msg: dict[str, Any], journal: Journal, followups: Followups
) -> str | None:
    """Record one event and update the VM; returns its name (None if it was not an event)."""
    name = msg.get("event")
    if not isinstance(name, str):
        return None
    raw = msg.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    when = qmp_timestamp(msg.get("timestamp"))
    record(journal, vm.name, "event", name, data, qemu_time=when)
    vm.event_counts[name] = vm.event_counts.get(name, 0) + 1
    vm.last_event, vm.last_event_time = name, when

    if name == "BALLOON_CHANGE":
        actual = data.get("actual")
        if isinstance(actual, int) and not isinstance(actual, bool) and actual >= 0:
            vm.balloon.actual_bytes = actual
    elif name in ("MEMORY_DEVICE_SIZE_CHANGE", "DEVICE_DELETED"):
        # A resized virtio-mem device, or an unplugged one (a DIMM has no event of its own):
        # read sizes and RAM layout again, so the host view stops scanning memory that left.
        followups.memory = True
    elif name in _STATUS_AFTER:
        vm.status, vm.running = _STATUS_AFTER[name]
        followups.status = True
    elif name in ("RESET", "POWERDOWN"):
        followups.status = True
    return name
