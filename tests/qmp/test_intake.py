"""Event intake: names, the per-VM bound of counted names, the event budget."""

from __future__ import annotations

from typing import Any, cast

from daemon.fleet import Fleet
from daemon.journal import Journal
from daemon.qmp.intake import (
    FOLLOWED_EVENTS,
    INVALID_EVENT,
    MAX_EVENT_NAMES,
    OTHER_EVENTS,
    EventBudget,
    Followups,
    count_event,
    counted_name,
    drop_event,
    event_name,
    fold_event_counts,
)


def test_event_names_keep_qmps_characters_and_length() -> None:
    assert event_name("BALLOON_CHANGE") == "BALLOON_CHANGE"
    assert event_name("bad name\ud800\n") == "bad_name__"
    assert event_name("X" * 500) == "X" * 64
    assert event_name(5) == event_name("") == event_name(["A"]) == INVALID_EVENT


def test_counted_names_are_bounded_and_followed_events_always_count() -> None:
    counts: dict[str, int] = {}
    for i in range(200):
        name = counted_name(counts, f"EV_{i}")
        counts[name] = counts.get(name, 0) + 1
    assert len(counts) == MAX_EVENT_NAMES + 1 and counts[OTHER_EVENTS] == 200 - MAX_EVENT_NAMES
    for name in FOLLOWED_EVENTS:
        assert counted_name(counts, name) == name
    assert counted_name(counts, "EV_3") == "EV_3"  # a name already counted stays itself


def test_counts_from_an_old_journal_are_folded_keeping_the_largest() -> None:
    old = {f"EV_{i}": i + 1 for i in range(1000)} | {"SHUTDOWN": 1}
    folded = fold_event_counts(old)
    assert sum(folded.values()) == sum(old.values())
    assert len(folded) == MAX_EVENT_NAMES + 2  # 64 names, SHUTDOWN, other
    assert folded["SHUTDOWN"] == 1 and "EV_999" in folded and "EV_0" not in folded


class _Submitted:
    """What ``Journal.submit`` was handed; ``full``: it takes nothing (a saturated journal)."""

    def __init__(self, full: bool = False) -> None:
        self.full = full
        self.entries: list[tuple[Any, ...]] = []

    def submit(self, *entry: Any, count_as: str | None = None) -> int | None:
        self.entries.append((*entry, count_as))
        return None if self.full else len(self.entries)


def test_an_event_counts_under_one_name_in_the_journal_and_the_vm() -> None:
    vm = Fleet().add("vm", "unix:/x", "connect")
    submitted = _Submitted()
    journal = cast(Journal, submitted)
    for i in range(MAX_EVENT_NAMES + 2):
        assert count_event(vm, journal, f"EV_{i}", {}, qemu_time=None, at=float(i))
    assert count_event(vm, journal, "STOP", {"n": 1}, qemu_time=5.5, at=7.0)
    assert vm.event_counts[OTHER_EVENTS] == 2 and vm.event_counts["STOP"] == 1
    assert [e[-1] for e in submitted.entries[-3:]] == [OTHER_EVENTS, OTHER_EVENTS, "STOP"]
    assert submitted.entries[-1] == ("vm", "event", "STOP", {"n": 1}, 5.5, "STOP")
    assert (vm.last_event, vm.last_event_time) == ("STOP", 7.0)
    # A journal that takes nothing: the VM still counts the event, the caller hears of it.
    assert not count_event(
        vm, cast(Journal, _Submitted(full=True)), "STOP", {}, qemu_time=None, at=8.0
    )
    assert vm.event_counts["STOP"] == 2


def test_the_budget_refills_at_its_rate() -> None:
    now = [0.0]
    budget = EventBudget(rate=10, burst=3, clock=lambda: now[0])
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.25  # 2.5 events' worth
    assert [budget.take() for _ in range(3)] == [True, True, False]
    now[0] = 100.0
    assert sum(budget.take() for _ in range(10)) == 3  # never more than a burst


def test_a_dropped_state_event_still_has_the_state_read_again() -> None:
    vm = Fleet().add("vm", "unix:/x", "connect")
    followups = Followups()
    drop_event(vm, {"event": "BALLOON_CHANGE"}, followups)
    assert not followups.any() and vm.events_dropped == 1
    drop_event(vm, {"event": "SHUTDOWN"}, followups)
    drop_event(vm, {"event": "DEVICE_DELETED"}, followups)
    drop_event(vm, {"event": ["odd"]}, followups)
    assert followups.status and followups.memory and vm.events_dropped == 4
