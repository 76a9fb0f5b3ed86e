"""When a session polls next: on a fixed period, locked to just after the guest's stats pushes.

The guest pushes statistics on its own timer (``guest-stats-polling-interval``); a poll reads
whatever it pushed last. On the same period as the guest, a poll that lands just before a push
reads stats a whole interval old, every time, for ever; one just after reads fresh ones. So the
schedule keeps a fixed period (a poll's own duration never makes it drift) and, while the guest
pushes on that same period, locks on: it runs slightly slow, so its polls drift to later after
the pushes, and pulls itself earlier whenever the stats it read are known to be over a second
old. Each poll then reads stats at most about a second old (tests/qmp/test_schedule.py).

QEMU stamps ``last-update`` in whole seconds of host wall-clock time, so a stats age read at
poll time is the real age plus up to one second. Only what exceeds one second is known to have
passed since the push, and only that much is taken off the next wait.
"""

from __future__ import annotations

LOCK_SLACK = 0.1  # seconds after a push a locked poll aims for, beyond the stamp's resolution
LOCK_DRIFT = 0.05  # locked polls run this much of an interval late, so they drift after pushes


class PollSchedule:
    """Deadlines (``loop.time()``) for one session's polls."""

    def __init__(self, interval: float, start: float) -> None:
        self.interval = interval
        self.due = start

    def advance(self, now: float, stats_age: float | None, stats_interval: int | None) -> float:
        """The next deadline, given the age of the stats the poll just read (seconds).

        A poll an event called early (``now`` before the deadline) keeps the deadline: each
        such poll would otherwise push the schedule back by a whole interval, and its stats
        age says nothing about the phase of the scheduled polls.
        """
        if now < self.due:
            return self.due
        self.due += self.interval + self.adjustment(stats_age, stats_interval)
        if self.due <= now:  # a poll took longer than the interval: start again from now
            self.due = now + self.interval
        return self.due

    def adjustment(self, stats_age: float | None, stats_interval: int | None) -> float:
        """Seconds to add to the next wait: 0 when the guest's pushes cannot be followed.

        A schedule can only be pulled earlier (an age says how long ago the push was, never
        how soon the next comes), so a locked schedule runs slightly slow: it drifts to later
        after the pushes, and is pulled back whenever its stats are known to be over a second
        old. A guest whose timer runs slower than ours (QEMU re-arms it only once stats
        arrive) is never overtaken, which would cost a whole interval of age.
        """
        if stats_age is None or stats_interval is None or stats_interval != self.interval:
            return 0.0  # no stats, or another period: ages say nothing about the phase
        if stats_age > self.interval + 1.0:
            return 0.0  # older than one period: the guest is not pushing on time
        known = stats_age - 1.0  # at least this long since the push (whole-second stamps)
        if known <= LOCK_SLACK:
            return LOCK_DRIFT * self.interval
        return -min(known - LOCK_SLACK, self.interval / 2)
