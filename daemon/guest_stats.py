"""Guest memory statistics from the virtio-balloon device, parsed and checked.

QEMU's ``qom-get PATH guest-stats`` returns ``{"stats": {"stat-...": N, ...}, "last-update": S}``.
The numbers come from the guest's virtio_balloon driver, so they are untrusted input:
:func:`parse_guest_stats` never raises on them, maps what it knows to typed fields, and flags
what is impossible rather than serve it.

How QEMU fills the reply (hw/virtio/virtio-balloon.c): every stat starts as 2^64-1, "unset";
each update from the guest resets them all to 2^64-1 first, then stores the tags the guest sent,
and sets ``last-update`` to the host's wall clock in whole seconds. So before the first update
every stat is 2^64-1 and ``last-update`` is 0, and a stat the guest's kernel does not send
(no CONFIG_VM_EVENT_COUNTERS, no CONFIG_HUGETLB_PAGE, a kernel older than the stat) stays 2^64-1
after updates too. QEMU 9.2 added the six stats Linux 6.12 sends (oom kills to direct reclaims).

Units, from the Linux driver (drivers/virtio/virtio_balloon.c, update_balloon_stats() and
update_balloon_vm_stats(); include/uapi/linux/virtio_balloon.h). "Counter" means a cumulative
count since the guest booted, which restarts at a guest reboot:

=========================  ======================  ==========================================
QMP name                   field                   meaning (kernel source) and unit
=========================  ======================  ==========================================
stat-swap-in               swap_in_bytes           counter, bytes: pages_to_bytes(PSWPIN)
stat-swap-out              swap_out_bytes          counter, bytes: pages_to_bytes(PSWPOUT)
stat-major-faults          major_faults            counter, faults: PGMAJFAULT
stat-minor-faults          minor_faults            counter, faults: PGFAULT (all faults,
                                                   major ones included)
stat-free-memory           free_bytes              gauge, bytes: si_meminfo() freeram
stat-total-memory          total_bytes             gauge, bytes: si_meminfo() totalram (RAM the
                                                   kernel manages: less than the VM's RAM, and
                                                   without the balloon unless deflate-on-oom)
stat-available-memory      available_bytes         gauge, bytes: si_mem_available(), as
                                                   MemAvailable in /proc/meminfo
stat-disk-caches           disk_caches_bytes       gauge, bytes: NR_FILE_PAGES (page cache,
                                                   including shmem/tmpfs and swap cache)
stat-htlb-pgalloc          hugetlb_allocations     counter, allocations: HTLB_BUDDY_PGALLOC
stat-htlb-pgfail           hugetlb_failures        counter, failed allocations:
                                                   HTLB_BUDDY_PGALLOC_FAIL
stat-oom-kills             oom_kills               counter, OOM kills: OOM_KILL
stat-alloc-stalls          alloc_stalls            counter, allocations that entered direct
                                                   reclaim: sum of ALLOCSTALL_<zone>
stat-async-scans           async_scans             counter, bytes scanned by kswapd:
                                                   pages_to_bytes(PGSCAN_KSWAPD)
stat-direct-scans          direct_scans            counter, bytes scanned in direct reclaim:
                                                   pages_to_bytes(PGSCAN_DIRECT)
stat-async-reclaims        async_reclaims          counter, bytes reclaimed by kswapd:
                                                   pages_to_bytes(PGSTEAL_KSWAPD)
stat-direct-reclaims       direct_reclaims         counter, bytes reclaimed in direct reclaim:
                                                   pages_to_bytes(PGSTEAL_DIRECT)
=========================  ======================  ==========================================

The four scan/reclaim stats are bytes although their field names do not say so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "COUNTER_FIELDS",
    "FUTURE_TOLERANCE_S",
    "STAT_FIELDS",
    "UNSET",
    "GuestStats",
    "counters_went_backwards",
    "format_guest_stats",
    "parse_guest_stats",
]

#: QEMU's value for a stat the guest has not sent.
UNSET: Final = 2**64 - 1
#: Values above this (other than UNSET) are impossible: no counter or size gets near 2^63.
MAX_VALUE: Final = 2**63 - 1
#: How far ``last-update`` may be ahead of ``now`` before it is a problem (clock steps).
FUTURE_TOLERANCE_S: Final = 10.0
#: Unknown stat names kept per reply, so a hostile peer cannot make a reply arbitrarily large.
MAX_UNKNOWN: Final = 64

#: QMP stat name -> GuestStats field.
STAT_FIELDS: Final[Mapping[str, str]] = {
    "stat-swap-in": "swap_in_bytes",
    "stat-swap-out": "swap_out_bytes",
    "stat-major-faults": "major_faults",
    "stat-minor-faults": "minor_faults",
    "stat-free-memory": "free_bytes",
    "stat-total-memory": "total_bytes",
    "stat-available-memory": "available_bytes",
    "stat-disk-caches": "disk_caches_bytes",
    "stat-htlb-pgalloc": "hugetlb_allocations",
    "stat-htlb-pgfail": "hugetlb_failures",
    "stat-oom-kills": "oom_kills",
    "stat-alloc-stalls": "alloc_stalls",
    "stat-async-scans": "async_scans",
    "stat-direct-scans": "direct_scans",
    "stat-async-reclaims": "async_reclaims",
    "stat-direct-reclaims": "direct_reclaims",
}
_FIELD_STATS: Final = {name: stat for stat, name in STAT_FIELDS.items()}

#: Fields that only grow while the guest runs (cumulative since its boot).
COUNTER_FIELDS: Final = (
    "swap_in_bytes",
    "swap_out_bytes",
    "major_faults",
    "minor_faults",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
)
# Sizes that cannot exceed the guest's total memory.
_PARTS_OF_TOTAL: Final = ("free_bytes", "available_bytes", "disk_caches_bytes")


@dataclass(frozen=True)
class GuestStats:
    """One guest-stats reply. A field is None when the guest has not sent that stat (or its
    value was rejected; see ``problems``). Units are in the module docstring.

    ``valid`` is False when anything in the reply was malformed or impossible; ``problems``
    says what. Values that contradict each other (free above total, total above the VM's RAM)
    are all set to None, because which one is wrong cannot be told: they are never served.
    """

    last_update: float | None = None
    """When QEMU received the stats (host wall clock, whole seconds); None: never."""
    swap_in_bytes: int | None = None
    swap_out_bytes: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None
    available_bytes: int | None = None
    disk_caches_bytes: int | None = None
    hugetlb_allocations: int | None = None
    hugetlb_failures: int | None = None
    oom_kills: int | None = None
    alloc_stalls: int | None = None
    async_scans: int | None = None
    direct_scans: int | None = None
    async_reclaims: int | None = None
    direct_reclaims: int | None = None
    valid: bool = True
    problems: tuple[str, ...] = ()
    unknown: dict[str, int] = field(default_factory=dict, hash=False)
    """``stat-*`` names this version does not know, with their values; not typed fields."""

    def age(self, now: float) -> float | None:
        """Seconds since the last update (never negative); None if never updated."""
        if self.last_update is None:
            return None
        return max(0.0, now - self.last_update)

    @property
    def available(self) -> bool:
        """Whether the guest has sent stats at all."""
        return self.last_update is not None


def parse_guest_stats(
    reply: object, *, ram_bytes: int | None = None, now: float | None = None
) -> GuestStats:
    """Parse the result of ``qom-get PATH guest-stats``; never raises on the reply's content.

    ``ram_bytes`` is the VM's RAM including plugged memory (``query-memory-size-summary``);
    when given, the guest's total must not exceed it. ``now`` (default ``time.time()``) is for
    the check that ``last-update`` is not in the future.

    Checks: the reply's shape; each value an integer in [0, 2^63-1] or UNSET; free, available
    and disk caches at most total; total at most ``ram_bytes``; values present only once
    ``last-update`` is set; ``last-update`` not more than FUTURE_TOLERANCE_S in the future.
    Counters going backwards need the previous reply: see :func:`counters_went_backwards`.
    """
    problems: list[str] = []
    if not isinstance(reply, Mapping):
        return _invalid(f"reply is not an object but {_type_name(reply)}")

    if "last-update" in reply:
        last_update = _parse_last_update(reply["last-update"], problems, now)
    else:
        problems.append("last-update is missing")
        last_update = None
    stats = reply.get("stats")
    if stats is None:
        problems.append("stats are missing")
        stats = {}
    elif not isinstance(stats, Mapping):
        problems.append(f"stats is not an object but {_type_name(stats)}")
        stats = {}

    values: dict[str, Any] = {}  # GuestStats field -> int | None
    unknown: dict[str, int] = {}
    for key, raw in stats.items():
        name = STAT_FIELDS.get(key) if isinstance(key, str) else None
        if name is None:
            # A newer QEMU's stat: kept for display, but its meaning is unknown, so it never
            # invalidates the reply.
            if isinstance(key, str) and key.startswith("stat-") and len(unknown) < MAX_UNKNOWN:
                value = _parse_value(key, raw, [])
                if value is not None:
                    unknown[key] = value
            continue
        values[name] = _parse_value(key, raw, problems)

    never_updated = type(reply.get("last-update")) is int and reply["last-update"] == 0
    if never_updated and any(v is not None for v in values.values()):
        problems.append("stats have values but last-update is 0 (never updated)")
    _check_sizes(values, ram_bytes, problems)
    return GuestStats(
        last_update=last_update,
        valid=not problems,
        problems=tuple(problems),
        unknown=unknown,
        **values,
    )


def counters_went_backwards(prev: GuestStats, cur: GuestStats) -> list[str]:
    """What decreased from ``prev`` to ``cur``: each counter present in both that went down,
    and ``last-update`` itself. Empty when nothing did.

    A guest reboot resets every counter, so a decrease is either a reboot or bad data; the
    caller, which knows about resets (RESET/SHUTDOWN events), decides which.
    """
    found: list[str] = []
    was, now = prev.last_update, cur.last_update
    if was is not None and now is not None and now < was:
        found.append(f"last-update went back from {was:.0f} to {now:.0f}")
    for name in COUNTER_FIELDS:
        before, after = getattr(prev, name), getattr(cur, name)
        if before is not None and after is not None and after < before:
            found.append(f"{_FIELD_STATS[name]} went back from {before} to {after}")
    return found


def format_guest_stats(stats: GuestStats) -> dict[str, Any]:
    """The ``qom-get guest-stats`` reply QEMU 9.2+ would give for ``stats`` (None -> UNSET);
    for the simulated guest and tests. ``parse_guest_stats`` of it gives ``stats`` back."""
    values = {stat: getattr(stats, name) for stat, name in STAT_FIELDS.items()}
    return {
        "stats": {
            **{stat: UNSET if value is None else value for stat, value in values.items()},
            **stats.unknown,
        },
        "last-update": 0 if stats.last_update is None else int(stats.last_update),
    }


# -- helpers ---------------------------------------------------------------------------------


def _invalid(problem: str) -> GuestStats:
    return GuestStats(valid=False, problems=(problem,))


def _parse_last_update(raw: object, problems: list[str], now: float | None) -> float | None:
    if type(raw) is not int:
        problems.append(f"last-update is not an integer but {_describe(raw)}")
        return None
    if raw == 0:
        return None
    if not 0 < raw <= MAX_VALUE:
        problems.append(f"last-update {_describe(raw)} is out of range")
        return None
    now = time.time() if now is None else now
    if math.isfinite(now) and raw > now + FUTURE_TOLERANCE_S:
        problems.append(f"last-update is {raw - now:.0f} s in the future")
    return float(raw)


def _parse_value(stat: str, raw: object, problems: list[str]) -> int | None:
    # bool is an int subclass, and JSON true is not a number.
    if type(raw) is not int:
        problems.append(f"{stat} is not an integer but {_describe(raw)}")
        return None
    if raw == UNSET:
        return None
    if raw < 0:
        problems.append(f"{stat} is negative: {_describe(raw)}")
        return None
    if raw > MAX_VALUE:
        problems.append(f"{stat} is impossibly large: {_describe(raw)}")
        return None
    return raw


def _check_sizes(values: dict[str, Any], ram_bytes: int | None, problems: list[str]) -> None:
    """Null, and report, sizes that contradict each other or the VM's RAM."""
    total = values.get("total_bytes")
    rejected: set[str] = set()
    ram = ram_bytes if ram_bytes is not None and ram_bytes > 0 else None
    if total is not None and ram is not None and total > ram:
        problems.append(f"total {_size(total)} > VM RAM {_size(ram)}")
        rejected.add("total_bytes")
        total = None
    for name in _PARTS_OF_TOTAL:
        value = values.get(name)
        if value is None:
            continue
        label = _FIELD_STATS[name].removeprefix("stat-").replace("-memory", "")
        if total is not None and value > total:
            problems.append(f"{label} {_size(value)} > total {_size(total)}")
            rejected.update((name, "total_bytes"))
        elif ram is not None and value > ram:
            problems.append(f"{label} {_size(value)} > VM RAM {_size(ram)}")
            rejected.add(name)
    for name in rejected:
        values[name] = None


def _size(n: int) -> str:
    """Bytes for people: ``2.0 GiB``."""
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _describe(value: object) -> str:
    """A short, safe description of an untrusted value for a problem message."""
    if type(value) is int:
        # Printing a huge int is slow and, past 4300 digits, an error.
        return str(value) if value.bit_length() <= 128 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, float | str | bool) or value is None:
        text = repr(value)
        return text if len(text) <= 40 else f"{text[:37]}..."
    return _type_name(value)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    for kind, name in _JSON_TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


# bool before int: True is an int too.
_JSON_TYPE_NAMES: Final = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (Mapping, "an object"),
    (list, "an array"),
)
