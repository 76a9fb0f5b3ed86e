"""QMP events into the journal and the fleet state.

Events are applied at once to what they describe (balloon size, run state). Anything that needs
a follow-up query is flagged in ``Followups`` for the session's poll loop, so the event pump never
waits on a command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from daemon.fleet import VMState
from daemon.journal import Journal

log = logging.getLogger(__name__)

# The events reclaimd follows. Others are journalled too: a VM's history should be complete.
FOLLOWED_EVENTS = frozenset(
    {
        "BALLOON_CHANGE",
        "MEMORY_DEVICE_SIZE_CHANGE",
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


def event_time(msg: dict[str, Any]) -> float | None:
    """QEMU's timestamp of an event, in seconds, or None when absent or malformed."""
    stamp = msg.get("timestamp")
    if not isinstance(stamp, dict):
        return None
    secs, usecs = stamp.get("seconds"), stamp.get("microseconds")
    if not isinstance(secs, int) or not isinstance(usecs, int) or secs < 0:
        return None
    # QEMU uses -1/-1 for "no clock yet"; handled by secs < 0 above.
    return secs + usecs / 1e6


def apply_event(
    vm: VMState, msg: dict[str, Any], journal: Journal, followups: Followups
) -> str | None:
    """Record one event and update the VM; returns its name (None if it was not an event)."""
    name = msg.get("event")
    if not isinstance(name, str):
        return None
    raw = msg.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    when = event_time(msg)
    journal.append(vm.name, "event", name, data, qemu_time=when)
    vm.event_counts[name] = vm.event_counts.get(name, 0) + 1
    vm.last_event, vm.last_event_time = name, when

    if name == "BALLOON_CHANGE":
        actual = data.get("actual")
        if isinstance(actual, int) and not isinstance(actual, bool) and actual >= 0:
            vm.balloon.actual_bytes = actual
    elif name == "MEMORY_DEVICE_SIZE_CHANGE":
        followups.memory = True
    elif name in _STATUS_AFTER:
        vm.status, vm.running = _STATUS_AFTER[name]
        followups.status = True
    elif name in ("RESET", "POWERDOWN"):
        followups.status = True
    return name
