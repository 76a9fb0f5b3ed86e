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

Each statistic is one row of ``STATS``, written on its ``GuestStats`` field: the QMP name, the
field, gauge or counter, the unit, the metric and what the Linux driver sends
(drivers/virtio/virtio_balloon.c, update_balloon_stats() and update_balloon_vm_stats();
include/uapi/linux/virtio_balloon.h). A counter is cumulative since the guest booted and
restarts at a guest reboot. The four scan/reclaim stats are bytes although their QMP names do
not say so; minor faults count all faults, major ones included. Total memory is what the guest
kernel manages (totalram): less than the VM's RAM, and without the balloon unless
deflate-on-oom is on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

from daemon.untrusted import MAX_INT, clean_text, describe, type_name

__all__ = [
    "FUTURE_TOLERANCE_S",
    "STATS",
    "UNSET",
    "GuestStats",
    "StatSpec",
    "format_guest_stats",
    "parse_guest_stats",
]

#: QEMU's value for a stat the guest has not sent.
UNSET: Final = 2**64 - 1
#: Values above this (other than UNSET) are impossible: no counter or size gets near 2^63.
MAX_VALUE: Final = MAX_INT
#: How far ``last-update`` may be ahead of ``now`` before it is a problem (clock steps).
FUTURE_TOLERANCE_S: Final = 10.0
#: Unknown stat names kept per reply, so a hostile peer cannot make a reply arbitrarily large.
MAX_UNKNOWN: Final = 64
MAX_UNKNOWN_NAME: Final = 64

StatKind = Literal["gauge", "counter"]


@dataclass(frozen=True)
class StatSpec:
    """One guest statistic: how QMP names it, the ``GuestStats`` field, and its metric.

    This table is the one description of the statistics: the parser, the REST schema, the
    metrics and the simulated guest all derive from it (see ``STATS``).
    """

    qmp: str  # the ``stat-*`` name in QEMU's ``guest-stats`` reply
    field: str  # the ``GuestStats`` attribute
    kind: StatKind  # gauge, or counter (cumulative since the guest booted)
    unit: str  # bytes, faults, allocations, kills, stalls
    metric: str  # Prometheus family (a counter's without ``_total``)
    help: str
    kernel: str  # what the Linux driver sends
    since: tuple[int, int]  # the QEMU version that first reports it


def _stat(
    qmp: str,
    kind: StatKind,
    unit: str,
    metric: str,
    help: str,
    kernel: str,
    since: tuple[int, int] = (7, 2),
) -> Any:
    """A ``GuestStats`` field described by its row of the statistics table."""
    row = (qmp, kind, unit, metric, help, kernel, since)
    return field(default=None, metadata={"stat": row})


@dataclass(frozen=True)
class GuestStats:
    """One guest-stats reply. A field is None when the guest has not sent that stat (or its
    value was rejected; see ``problems``). Units are in the module docstring.

    ``valid`` is False when anything in the reply was malformed or impossible; ``problems``
    says what. Values that contradict each other (free above total, total above the VM's RAM)
    are all set to None, because which one is wrong cannot be told: they are never served.

    Each statistic's field carries its row of the table (``STATS``), in QEMU's order.
    """

    last_update: float | None = None
    """When QEMU received the stats (host wall clock, whole seconds); None: never."""
    # fmt: off
    # (QMP name, kind, unit, metric, help, what the Linux driver sends[, QEMU version])
    swap_in_bytes: int | None = _stat(
        "stat-swap-in", "counter", "bytes", "qemu_guest_swap_in_bytes",
        "Bytes the guest swapped in", "pages_to_bytes(PSWPIN)",
    )
    swap_out_bytes: int | None = _stat(
        "stat-swap-out", "counter", "bytes", "qemu_guest_swap_out_bytes",
        "Bytes the guest swapped out", "pages_to_bytes(PSWPOUT)",
    )
    major_faults: int | None = _stat(
        "stat-major-faults", "counter", "faults", "qemu_guest_major_faults",
        "Guest major page faults", "PGMAJFAULT",
    )
    minor_faults: int | None = _stat(
        "stat-minor-faults", "counter", "faults", "qemu_guest_minor_faults",
        "Guest minor page faults", "PGFAULT (all faults, major ones included)",
    )
    free_bytes: int | None = _stat(
        "stat-free-memory", "gauge", "bytes", "qemu_guest_memory_free_bytes",
        "Guest free memory (MemFree; virsh dommemstat calls it unused)", "si_meminfo() freeram",
    )
    total_bytes: int | None = _stat(
        "stat-total-memory", "gauge", "bytes", "qemu_guest_memory_total_bytes",
        "Guest total memory (MemTotal; virsh dommemstat calls it available)",
        "si_meminfo() totalram",
    )
    available_bytes: int | None = _stat(
        "stat-available-memory", "gauge", "bytes", "qemu_guest_memory_available_bytes",
        "Guest available memory (MemAvailable; virsh dommemstat calls it usable)",
        "si_mem_available(), MemAvailable in /proc/meminfo",
    )
    disk_caches_bytes: int | None = _stat(
        "stat-disk-caches", "gauge", "bytes", "qemu_guest_disk_caches_bytes",
        "Guest page cache (NR_FILE_PAGES: includes shmem and tmpfs, which cannot be dropped; "
        "virsh dommemstat calls it disk_caches)",
        "NR_FILE_PAGES (page cache, shmem/tmpfs and swap cache)",
    )
    hugetlb_allocations: int | None = _stat(
        "stat-htlb-pgalloc", "counter", "allocations", "qemu_guest_hugetlb_allocations",
        "Guest hugetlb page allocations", "HTLB_BUDDY_PGALLOC",
    )
    hugetlb_failures: int | None = _stat(
        "stat-htlb-pgfail", "counter", "allocations", "qemu_guest_hugetlb_failures",
        "Guest hugetlb allocation failures", "HTLB_BUDDY_PGALLOC_FAIL",
    )
    oom_kills: int | None = _stat(
        "stat-oom-kills", "counter", "kills", "qemu_guest_oom_kills",
        "Guest OOM kills (QEMU 9.2+)", "OOM_KILL", (9, 2),
    )
    alloc_stalls: int | None = _stat(
        "stat-alloc-stalls", "counter", "stalls", "qemu_guest_alloc_stalls",
        "Guest allocation stalls (QEMU 9.2+)", "sum of ALLOCSTALL_<zone>", (9, 2),
    )
    async_scans: int | None = _stat(
        "stat-async-scans", "counter", "bytes", "qemu_guest_kswapd_scanned_bytes",
        "Bytes scanned by kswapd (QEMU 9.2+)", "pages_to_bytes(PGSCAN_KSWAPD)", (9, 2),
    )
    direct_scans: int | None = _stat(
        "stat-direct-scans", "counter", "bytes", "qemu_guest_direct_scanned_bytes",
        "Bytes scanned by direct reclaim (QEMU 9.2+)", "pages_to_bytes(PGSCAN_DIRECT)",
        (9, 2),
    )
    async_reclaims: int | None = _stat(
        "stat-async-reclaims", "counter", "bytes", "qemu_guest_kswapd_reclaimed_bytes",
        "Bytes reclaimed by kswapd (QEMU 9.2+)", "pages_to_bytes(PGSTEAL_KSWAPD)",
        (9, 2),
    )
    direct_reclaims: int | None = _stat(
        "stat-direct-reclaims", "counter", "bytes", "qemu_guest_direct_reclaimed_bytes",
        "Bytes reclaimed directly (QEMU 9.2+)", "pages_to_bytes(PGSTEAL_DIRECT)", (9, 2),
    )
    # fmt: on
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


#: The statistics table, in QEMU's order (``balloon_stat_names`` in hw/virtio/virtio-balloon.c).
STATS: Final[tuple[StatSpec, ...]] = tuple(
    StatSpec(f.metadata["stat"][0], f.name, *f.metadata["stat"][1:])
    for f in fields(GuestStats)
    if "stat" in f.metadata
)
_BY_QMP: Final = {s.qmp: s.field for s in STATS}
_QMP_NAME: Final = {s.field: s.qmp for s in STATS}
# Sizes that cannot exceed the guest's total memory.
_PARTS_OF_TOTAL: Final = ("free_bytes", "available_bytes", "disk_caches_bytes")


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
    """
    problems: list[str] = []
    if not isinstance(reply, Mapping):
        return _invalid(f"reply is not an object but {type_name(reply)}")

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
        problems.append(f"stats is not an object but {type_name(stats)}")
        stats = {}

    values: dict[str, Any] = {}  # GuestStats field -> int | None
    unknown: dict[str, int] = {}
    for key, raw in stats.items():
        name = _BY_QMP.get(key) if isinstance(key, str) else None
        if name is None:
            # A newer QEMU's stat: kept for display, but its meaning is unknown, so it never
            # invalidates the reply.
            if isinstance(key, str) and key.startswith("stat-") and len(unknown) < MAX_UNKNOWN:
                value = _parse_value(key, raw, [])
                if value is not None:
                    unknown[clean_text(key, MAX_UNKNOWN_NAME)] = value
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


def format_guest_stats(stats: GuestStats, since: tuple[int, int] | None = None) -> dict[str, Any]:
    """The ``qom-get guest-stats`` reply QEMU gives for ``stats`` (None -> UNSET), with the
    statistics a QEMU of version ``since`` knows (default: all); for the simulated guest and
    tests. ``parse_guest_stats`` of it gives ``stats`` back."""
    known = (s for s in STATS if since is None or s.since <= since)
    return {
        "stats": {
            **{s.qmp: UNSET if (v := getattr(stats, s.field)) is None else v for s in known},
            **stats.unknown,
        },
        "last-update": 0 if stats.last_update is None else int(stats.last_update),
    }


# -- helpers ---------------------------------------------------------------------------------


def _invalid(problem: str) -> GuestStats:
    return GuestStats(valid=False, problems=(problem,))


def _parse_last_update(raw: object, problems: list[str], now: float | None) -> float | None:
    if type(raw) is not int:
        problems.append(f"last-update is not an integer but {describe(raw)}")
        return None
    if raw == 0:
        return None
    if not 0 < raw <= MAX_VALUE:
        problems.append(f"last-update {describe(raw)} is out of range")
        return None
    now = time.time() if now is None else now
    if math.isfinite(now) and raw > now + FUTURE_TOLERANCE_S:
        problems.append(f"last-update is {raw - now:.0f} s in the future")
    return float(raw)


def _parse_value(stat: str, raw: object, problems: list[str]) -> int | None:
    # bool is an int subclass, and JSON true is not a number.
    if type(raw) is not int:
        problems.append(f"{stat} is not an integer but {describe(raw)}")
        return None
    if raw == UNSET:
        return None
    if raw < 0:
        problems.append(f"{stat} is negative: {describe(raw)}")
        return None
    if raw > MAX_VALUE:
        problems.append(f"{stat} is impossibly large: {describe(raw)}")
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
        label = _QMP_NAME[name].removeprefix("stat-").replace("-memory", "")
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
