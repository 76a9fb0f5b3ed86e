"""Balloon advice: per VM, the balloon target that returns memory only a balloon can, and what
it would return.

A balloon inflates by taking free pages from the guest's allocator, smallest blocks first
(``__rmqueue_smallest``), and reaches the page cache only once free memory is down to the
watermarks. So, from the estimate's split of the guest's memory:

- **stranded** memory (free, resident, in blocks below the reporting order) is what the balloon
  takes first, and only a balloon returns it: all of it counts;
- **reported** and **reportable** memory (the large free blocks) the balloon would take next:
  the host has it back already, or reporting returns it within seconds. It never counts as
  gain, and the balloon goes through it only to reach the cache, when the cache it then takes
  is more than the large blocks it swallows and those are within the margin;
- **cache** is squeezed last, down to what keeps the guest at its floor.

The target never goes below the guest's used memory plus the margin, nor below a configured
minimum, nor above the VM's RAM. While the guest shows pressure (``Pressure``) there is no
squeeze: the advice is to give the guest memory back, more the more signals there are, which
keeps the advice monotone in pressure.

Pure: no I/O, no clock; ``PressureWatch`` keeps the previous guest statistics to turn counters
into rates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.guest_stats import GuestStats
from daemon.ledger.estimate import Estimate

MiB = 1 << 20
#: Swap-ins faster than this (bytes/s) are pressure: a guest that swaps in at all is short.
SWAP_IN_RATE = 64 * 1024
#: Major faults above this many times their own baseline rate, in two windows in a row, are
#: pressure (a guest reading files faults all the time: only a lasting rise says it lost its
#: cache; stats stamps are whole seconds, so one short window can look twice as fast).
MAJOR_FAULT_RISE = 3.0
MAJOR_FAULT_FLOOR = 200.0  # faults/s below which no rise counts
BASELINE_WEIGHT = 0.1  # of a new window in the major-fault baseline


@dataclass(frozen=True)
class Pressure:
    """Signs that the guest is short of memory in the window between two stats updates."""

    swap_in_bytes_per_second: float | None = None
    major_faults_per_second: float | None = None
    major_fault_baseline: float | None = None
    alloc_stalls: int | None = None  # in the window; None: the guest does not send them
    oom_kills: int | None = None
    available_bytes: int | None = None
    margin_bytes: int = 0
    signals: tuple[str, ...] = ()

    @property
    def under(self) -> bool:
        return bool(self.signals)


def pressure_signals(
    *,
    swap_in_rate: float | None,
    major_rate: float | None,
    major_baseline: float | None,
    alloc_stalls: int | None,
    oom_kills: int | None,
    available: int | None,
    margin: int,
) -> tuple[str, ...]:
    """The names of the pressure signals these inputs show, in a fixed order."""
    signals = []
    if oom_kills:
        signals.append("oom_kills")
    if alloc_stalls:
        signals.append("alloc_stalls")
    if swap_in_rate is not None and swap_in_rate > SWAP_IN_RATE:
        signals.append("swap_in")
    if (
        major_rate is not None
        and major_baseline is not None
        and major_rate > max(MAJOR_FAULT_FLOOR, MAJOR_FAULT_RISE * major_baseline)
    ):
        signals.append("major_faults")
    if available is not None and available < margin:
        signals.append("available_below_margin")
    return tuple(signals)


@dataclass
class PressureWatch:
    """Rates of the guest's pressure counters from one stats update to the next."""

    _last: GuestStats | None = None
    _pressure: Pressure = field(default_factory=Pressure)
    _baseline: float | None = None
    _major_before: float | None = None  # the previous window's rate

    def observe(self, stats: GuestStats | None, margin: int) -> Pressure:
        """The pressure as of ``stats`` (the same until the guest sends new ones)."""
        if stats is None or not stats.valid or stats.last_update is None:
            return self._pressure
        last = self._last
        if last is not None and last.last_update == stats.last_update:
            return self._pressure  # no new update: the same window
        self._last = stats
        if last is None or last.last_update is None or stats.last_update < last.last_update:
            self._pressure = self._of(None, None, None, None, stats, margin)
            return self._pressure
        dt = stats.last_update - last.last_update
        swap = _rate(last.swap_in_bytes, stats.swap_in_bytes, dt)
        major = _rate(last.major_faults, stats.major_faults, dt)
        major_before, self._major_before = self._major_before, major
        lasting = None if major is None or major_before is None else min(major, major_before)
        stalls = _delta(last.alloc_stalls, stats.alloc_stalls)
        kills = _delta(last.oom_kills, stats.oom_kills)
        self._pressure = self._of(swap, lasting, stalls, kills, stats, margin)
        if major is not None and not self._pressure.under:
            base = self._baseline
            self._baseline = major if base is None else base + BASELINE_WEIGHT * (major - base)
        return self._pressure

    def _of(
        self,
        swap: float | None,
        major: float | None,
        stalls: int | None,
        kills: int | None,
        stats: GuestStats,
        margin: int,
    ) -> Pressure:
        signals = pressure_signals(
            swap_in_rate=swap,
            major_rate=major,
            major_baseline=self._baseline,
            alloc_stalls=stalls,
            oom_kills=kills,
            available=stats.available_bytes,
            margin=margin,
        )
        return Pressure(
            swap, major, self._baseline, stalls, kills, stats.available_bytes, margin, signals
        )


@dataclass(frozen=True)
class Advice:
    """The recommended balloon target of one VM and what it would return to the host."""

    at: float
    target_bytes: int | None  # what the guest should have (QMP ``balloon`` value); None: none
    expected_gain_bytes: int  # host memory it returns beyond what reporting does
    current_bytes: int | None  # the balloon's actual now
    floor_bytes: int | None  # used + margin, or the configured minimum if higher
    action: str  # inflate, deflate, hold, none
    reasons: tuple[str, ...]
    pressure: Pressure


def used_bytes(total: int, available: int, ram: int, actual: int | None, doom: bool) -> int:
    """What the guest uses: total less available, less the balloon where deflate-on-oom
    leaves its pages in the guest's total."""
    used = max(0, total - available)
    if doom and actual is not None:
        used = max(0, used - (ram - actual))
    return used


def advise(
    *,
    at: float,
    estimate: Estimate | None,
    stats: GuestStats | None,
    actual_bytes: int | None,
    deflate_on_oom: bool,
    pressure: Pressure,
    minimum_bytes: int | None = None,
) -> Advice:
    """The advice for one VM from the inputs of one moment (see the module docstring)."""

    def none(why: str) -> Advice:
        return Advice(at, None, 0, actual_bytes, None, "none", (why,), pressure)

    if estimate is None or estimate.ram_bytes is None:
        return none("no estimate yet")
    ram = estimate.ram_bytes
    if actual_bytes is None:
        return none("no balloon")
    if stats is None or not stats.valid or stats.total_bytes is None:
        return none("no usable guest statistics")
    if stats.available_bytes is None:
        return none("the guest does not send its available memory")
    margin = estimate.margin_bytes
    used = used_bytes(stats.total_bytes, stats.available_bytes, ram, actual_bytes, deflate_on_oom)
    floor = min(ram, max(used + margin, minimum_bytes or 0))
    reasons: list[str] = [f"floor {floor // MiB} MiB: used {used // MiB} + margin {margin // MiB}"]
    if minimum_bytes is not None and minimum_bytes > used + margin:
        reasons[0] = f"floor {floor // MiB} MiB: the configured minimum"

    if pressure.under:
        give = len(pressure.signals) * margin
        target = min(ram, max(actual_bytes, floor) + give)
        reasons.append("pressure: " + ", ".join(pressure.signals) + "; no squeeze")
        action = "deflate" if target > actual_bytes else "hold"
        return Advice(at, target, 0, actual_bytes, floor, action, tuple(reasons), pressure)

    c = estimate.components
    parts = {k: c[k].bytes if k in c else None for k in ("stranded", "cache", "reported")}
    reportable = c["reportable"].bytes if "reportable" in c else None
    if any(v is None for v in (*parts.values(), reportable)):
        missing = next(k for k in ("stranded", "reportable", "cache", "reported") if k in c)
        return none(c[missing].reason or "the free split is not known yet")
    stranded, cache, reported = (v or 0 for v in parts.values())
    large = reported + (reportable or 0)

    room = max(0, actual_bytes - floor)  # how far the balloon may grow at most
    grow = min(stranded, room)
    gain = grow
    reasons.append(f"stranded {stranded // MiB} MiB: only a balloon returns it")
    cache_take = min(cache, room - grow - large) if room > grow + large else 0
    if cache_take > large and large <= margin:
        grow += large + cache_take
        gain += cache_take
        reasons.append(
            f"cache {cache_take // MiB} MiB, past {large // MiB} MiB of large free blocks"
        )
    elif cache:
        reasons.append(
            f"cache {cache // MiB} MiB left: reaching it swallows {large // MiB} MiB of "
            "reported or reportable memory"
        )
    if large:
        reasons.append(f"reported and reportable {large // MiB} MiB: reporting returns it")
    if actual_bytes > ram:
        return none("balloon actual above RAM")
    target = actual_bytes - grow
    action = "inflate" if grow > 0 else "hold"
    return Advice(at, target, gain, actual_bytes, floor, action, tuple(reasons), pressure)


def _rate(before: int | None, now: int | None, dt: float) -> float | None:
    d = _delta(before, now)
    return None if d is None else d / dt


def _delta(before: int | None, now: int | None) -> int | None:
    """A counter's growth; a counter that went back (guest reboot) starts over from 0."""
    if before is None or now is None:
        return None
    return now - before if now >= before else now
