"""PollSchedule: a fixed period that locks onto just after the guest's stats pushes."""

from __future__ import annotations

import bisect
import math
import random

import pytest

from daemon.qmp.schedule import LOCK_DRIFT, LOCK_SLACK, PollSchedule

START = 1_800_000_000.3  # wall-clock seconds; pushes fall at any fraction of a second
INTERVAL = 2.0


def pushes_of(first: float, latency: float, until: float) -> list[float]:
    """A guest pushing stats every INTERVAL s plus its latency: QEMU re-arms its stats timer
    only when the guest's stats arrive, so its period runs slow by the guest's latency."""
    times = [first]
    while times[-1] < until:
        times.append(times[-1] + INTERVAL + latency)
    return times


def read_age(pushes: list[float], at: float) -> float:
    """The real age of the stats a poll at ``at`` reads."""
    return at - pushes[bisect.bisect_right(pushes, at) - 1]


def locked_ages(first: float, latency: float, polls: int = 300) -> list[float]:
    pushes = pushes_of(first, latency, START + 3 * polls * INTERVAL)
    schedule = PollSchedule(INTERVAL, start=START)
    at, ages = START, []
    for _ in range(polls):
        ages.append(read_age(pushes, at))
        last = pushes[bisect.bisect_right(pushes, at) - 1]
        stamped_age = at - math.floor(last)  # QEMU stamps last-update in whole seconds
        at = schedule.advance(at + 0.02, stamped_age, int(INTERVAL))
    return ages[20:]


def fixed_ages(first: float, latency: float, polls: int = 300) -> list[float]:
    pushes = pushes_of(first, latency, START + 3 * polls * INTERVAL)
    return [read_age(pushes, START + k * INTERVAL) for k in range(polls)][20:]


@pytest.mark.parametrize("latency", [0.0, 0.003, 0.03, 0.08])
def test_locked_polls_read_stats_within_about_a_second_of_each_push(latency: float) -> None:
    rand = random.Random(1)
    bound = 1.0 + LOCK_SLACK + LOCK_DRIFT * INTERVAL + 0.05
    for _ in range(20):
        ages = locked_ages(START - rand.uniform(0, INTERVAL), latency)
        assert min(ages) >= 0.0 and max(ages) <= bound, (latency, max(ages))


def test_locking_halves_the_age_of_the_stats_a_fixed_schedule_reads() -> None:
    rand = random.Random(2)
    locked, fixed = [], []
    for _ in range(40):
        first, latency = START - rand.uniform(0, INTERVAL), rand.uniform(0, 0.03)
        locked += locked_ages(first, latency)
        fixed += fixed_ages(first, latency)
    assert sum(locked) / len(locked) < 0.7 * sum(fixed) / len(fixed)
    assert max(fixed) > 1.9  # some phases of a fixed schedule read stats an interval old


def test_no_lock_when_the_guest_pushes_on_another_period_or_falls_behind() -> None:
    schedule = PollSchedule(INTERVAL, start=0.0)
    assert schedule.adjustment(1.9, stats_interval=10) == 0.0  # another period
    assert schedule.adjustment(1.9, stats_interval=None) == 0.0
    assert schedule.adjustment(None, stats_interval=2) == 0.0
    assert schedule.adjustment(7.0, stats_interval=2) == 0.0  # stale: the guest is not pushing
    assert schedule.adjustment(1.05, stats_interval=2) == pytest.approx(LOCK_DRIFT * INTERVAL)
    assert schedule.adjustment(1.9, stats_interval=2) == pytest.approx(-0.8)
    assert schedule.adjustment(3.0, stats_interval=2) == pytest.approx(-1.0)  # half a period


def test_a_slow_poll_restarts_the_schedule_from_now() -> None:
    schedule = PollSchedule(INTERVAL, start=10.0)
    assert schedule.advance(10.0, None, None) == 12.0
    assert schedule.advance(15.5, None, None) == 17.5  # 12.0 had passed long ago


def test_polls_an_event_called_early_keep_the_deadline() -> None:
    schedule = PollSchedule(INTERVAL, start=10.0)
    assert schedule.advance(10.02, 1.5, 2) == pytest.approx(12.0 - 0.4)  # locked: 1.5 s old
    for early in (10.3, 10.7, 11.1, 11.5):  # STOP, RESUME, ... each wake a poll
        assert schedule.advance(early, 1.9, 2) == pytest.approx(11.6)
    assert schedule.advance(11.62, 1.05, 2) == pytest.approx(13.6 + LOCK_DRIFT * INTERVAL)
