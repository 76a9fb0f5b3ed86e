"""QMP events into the journal and the fleet state.

Events are applied at once to what they describe (balloon size, run state). Anything that needs
a follow-up query is flagged in ``Followups`` for the session's poll loop, so the event pump never
waits on a command, and journal entries are handed to the journal's writer thread (``submit``),
so it never waits on the disk either.

An event is untrusted input like everything else a VM sends: its name is reduced to the
characters QMP event names use and to ``MAX_EVENT_NAME`` characters, its data is cleaned and
bounded (``daemon.untrusted.clean_json``), and a VM's event counts keep at most
``MAX_EVENT_NAMES`` names: the events reclaimd follows always count under their own names, any
further new name counts as ``other``. So a VM that invents a new event name per message adds
one series to ``/metrics``, not one per name.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from daemon.fleet import VMState
from daemon.instruments import JOURNAL_ERRORS, QMP_EVENTS_DROPPED
from daemon.journal import Journal, JournalError, qmp_timestamp
from daemon.untrusted import MAX_INT, bad_size, bounded_int, clean_json

log = logging.getLogger(__name__)

# The events reclaimd follows. Others are journalled too: a VM's history should be complete.
FOLLOWED_EVENTS: Final = frozenset(
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
#: Followed events whose loss would leave the VM's state wrong. A BALLOON_CHANGE is not one:
#: each carries the whole size, so the newest says all the older ones did.
STATE_EVENTS: Final = FOLLOWED_EVENTS - {"BALLOON_CHANGE"}

MAX_EVENT_NAME: Final = 64
#: Names counted per VM besides the followed events; beyond, events count as OTHER_EVENTS.
MAX_EVENT_NAMES: Final = 64
OTHER_EVENTS: Final = "other"
INVALID_EVENT: Final = "INVALID"
_NOT_EVENT_NAME: Final = re.compile(r"[^A-Za-z0-9_]")

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
    *,
    count_as: str | None = None,
) -> bool:
    """Hand one entry to the journal; False if it was not taken (the journal is saturated or
    failing). A journal that fails (disk full) is logged and counted, never fatal: the session
    goes on following its VM."""
    try:
        return journal.submit(vm, kind, name, data, qemu_time, count_as=count_as) is not None
    except JournalError as exc:
        JOURNAL_ERRORS.inc()
        log.error("journal: cannot record %s %s of %s: %s", kind, name, vm, exc)
        return False


def count_dropped(vm: VMState, n: int = 1) -> None:
    """``n`` events of ``vm`` dropped before they were recorded: counted at once, live."""
    vm.events_dropped += n
    QMP_EVENTS_DROPPED.labels(vm.name).inc(n)


class EventBudget:
    """How many events a VM may have applied: ``rate`` a second, in bursts of ``burst``.

    QEMU limits what a guest can trigger at will (BALLOON_CHANGE and others, to one a second
    each), so a VM that sends thousands of events a second is broken or hostile. Beyond the
    budget its events are dropped, and counted, before they cost anything more than reading them:
    the daemon's time goes to the API and the other VMs.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def drop_event(vm: VMState, msg: Mapping[str, Any], followups: Followups) -> None:
    """Count an event dropped over the budget; one that changes the VM's state still makes the
    poll loop read that state again, so the VM's record stays right without it."""
    count_dropped(vm)
    name = msg.get("event")
    if not isinstance(name, str):
        return
    if name in ("MEMORY_DEVICE_SIZE_CHANGE", "DEVICE_DELETED"):
        followups.memory = True
    elif name in STATE_EVENTS:
        followups.status = True  # a BALLOON_CHANGE needs nothing: every poll reads the balloon


def event_name(raw: object) -> str:
    """The name to record an event under: QMP's characters (letters, digits, ``_``; others
    become ``_``), at most MAX_EVENT_NAME; INVALID_EVENT for a name that is not a string."""
    if not isinstance(raw, str) or not raw:
        return INVALID_EVENT
    return _NOT_EVENT_NAME.sub("_", raw[:MAX_EVENT_NAME])


def counted_name(counts: Mapping[str, int], name: str) -> str:
    """The name an event counts under in a VM's ``counts``: its own while the VM has fewer than
    MAX_EVENT_NAMES names (the followed events always), else OTHER_EVENTS."""
    if name in counts or name in FOLLOWED_EVENTS:
        return name
    others = len(counts) - sum(1 for n in FOLLOWED_EVENTS if n in counts)
    others -= OTHER_EVENTS in counts
    return name if others < MAX_EVENT_NAMES else OTHER_EVENTS


def fold_event_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` (as a journal of any age holds them) within the bound of ``counted_name``:
    the names beyond it, smallest counts first, are added into OTHER_EVENTS."""
    folded: dict[str, int] = {}
    for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        key = counted_name(folded, name)
        folded[key] = folded.get(key, 0) + count
    return folded


def count_event(
    vm: VMState,
    journal: Journal,
    name: str,
    data: Mapping[str, Any],
    *,
    qemu_time: float | None,
    at: float | None,
) -> bool:
    """Journal one event of ``vm`` and count it in the VM's event counts (under
    :func:`counted_name`, journal and counts alike), as its last event at ``at``; False if the
    journal did not take it. ``qemu_time``: QEMU's own time of the event, when it gave one."""
    counted = counted_name(vm.event_counts, name)
    taken = record(journal, vm.name, "event", name, data, qemu_time, count_as=counted)
    vm.event_counts[counted] = vm.event_counts.get(counted, 0) + 1
    vm.last_event, vm.last_event_time = name, at
    return taken


def apply_event(
    vm: VMState, msg: Mapping[str, Any], journal: Journal, followups: Followups
) -> str | None:
    """Record one event and update the VM; returns the name it was recorded under (None if
    the message was not an event)."""
    if "event" not in msg:
        return None
    name = event_name(msg["event"])
    raw = msg.get("data")
    data: dict[str, Any] = clean_json(raw) if isinstance(raw, Mapping) else {}
    when = qmp_timestamp(msg.get("timestamp"))
    if not count_event(vm, journal, name, data, qemu_time=when, at=when):
        count_dropped(vm)

    if name == "BALLOON_CHANGE":
        # Guest-controlled through QEMU's arithmetic: never more than the VM's RAM.
        ram = vm.memory.ram_bytes or MAX_INT
        actual = bounded_int(data.get("actual"), 0, ram)
        if actual is not None:
            vm.balloon.actual_bytes = actual
        else:
            vm.balloon.problem = f"BALLOON_CHANGE: {bad_size(data.get('actual'), ram)}"
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
