"""``virDomainMemoryStats`` -> :class:`daemon.guest_stats.GuestStats`, checked as QMP's are.

libvirt reads the same ``qom-get guest-stats`` that reclaimd reads over QMP, then renames and
scales it (src/qemu/qemu_monitor_json.c, qemuMonitorJSONGetMemoryStats). The names are a trap:

=================  =========================  =========================================
libvirt            QEMU                       meaning
=================  =========================  =========================================
``unused``         stat-free-memory           MemFree
``available``      stat-total-memory          the guest's TOTAL (MemTotal), not available
``usable``         stat-available-memory      MemAvailable
``disk_caches``    stat-disk-caches           page cache
``swap_in/out``    stat-swap-in/out           KiB, not pages
``major_fault``    stat-major-faults          count
``minor_fault``    stat-minor-faults          count
``hugetlb_pg*``    stat-htlb-pgalloc/pgfail   count
``last_update``    last-update                epoch seconds
``actual``         query-balloon actual       the balloon's actual size (not a guest stat)
``rss``            -                          QEMU's whole RSS, from the host's /proc
=================  =========================  =========================================

Sizes are KiB, rounded down from QEMU's bytes; a stat QEMU reports as unset (2^64-1) is left
out, and libvirt 9 knows none of the six stats QEMU 9.2 added (oom kills, reclaims...). So the
reply is turned back into the QMP shape, sizes times 1024, and handed to
:func:`daemon.guest_stats.parse_guest_stats`: one validation for both sources (problems then
name QEMU's stats, which is what libvirt read). Bytes are exact to the KiB, as ``virsh
dommemstat`` shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from daemon.guest_stats import MAX_VALUE, GuestStats, parse_guest_stats

__all__ = ["LIBVIRT_STATS", "LibvirtMemoryStats", "parse_memory_stats"]

KiB: Final = 1024

#: libvirt memoryStats() key -> (QEMU stat name, bytes per libvirt unit).
LIBVIRT_STATS: Final[Mapping[str, tuple[str, int]]] = {
    "swap_in": ("stat-swap-in", KiB),
    "swap_out": ("stat-swap-out", KiB),
    "major_fault": ("stat-major-faults", 1),
    "minor_fault": ("stat-minor-faults", 1),
    "unused": ("stat-free-memory", KiB),
    "available": ("stat-total-memory", KiB),
    "usable": ("stat-available-memory", KiB),
    "disk_caches": ("stat-disk-caches", KiB),
    "hugetlb_pgalloc": ("stat-htlb-pgalloc", 1),
    "hugetlb_pgfail": ("stat-htlb-pgfail", 1),
}


@dataclass(frozen=True)
class LibvirtMemoryStats:
    """One ``memoryStats()`` reply.

    ``guest``: the guest's statistics (``guest.available`` is False before the guest's first
    update, or when the balloon has no stats period). ``balloon_actual_bytes``: the balloon's
    actual size (QEMU's ``query-balloon``), None when the domain has no balloon.
    ``qemu_rss_bytes``: the QEMU process's RSS as libvirt read it from /proc (all of QEMU, not
    only guest RAM). ``problems``: what was wrong with the host-side values (the guest-side
    ones are in ``guest.problems``).
    """

    guest: GuestStats
    balloon_actual_bytes: int | None = None
    qemu_rss_bytes: int | None = None
    problems: tuple[str, ...] = ()


def _kib(reply: Mapping[object, object], key: str, problems: list[str]) -> int | None:
    raw = reply.get(key)
    if raw is None:
        return None
    if type(raw) is not int or not 0 <= raw * KiB <= MAX_VALUE:
        problems.append(f"{key} is not a size in KiB: {str(raw)[:40]!r}")
        return None
    return raw * KiB


def parse_memory_stats(
    reply: object, *, ram_bytes: int | None = None, now: float | None = None
) -> LibvirtMemoryStats:
    """Parse what ``virDomain.memoryStats()`` returned; never raises on its content.

    ``ram_bytes`` and ``now`` are as for :func:`daemon.guest_stats.parse_guest_stats` (pass
    the domain's ``<memory>``, i.e. ``info()``'s maximum memory).
    """
    if not isinstance(reply, Mapping):
        bad = parse_guest_stats(reply)  # the same "not an object" problem QMP's would give
        return LibvirtMemoryStats(guest=bad)
    problems: list[str] = []
    actual = _kib(reply, "actual", problems)
    rss = _kib(reply, "rss", problems)
    stats: dict[str, object] = {}
    for key, (stat, unit) in LIBVIRT_STATS.items():
        if key not in reply:
            continue
        raw = reply[key]
        # Scale only what is a number; anything else goes through as is for the parser to name.
        stats[stat] = raw * unit if type(raw) is int else raw
    if "last_update" in reply:
        qmp_shape: dict[str, object] = {"stats": stats, "last-update": reply["last_update"]}
        guest = parse_guest_stats(qmp_shape, ram_bytes=ram_bytes, now=now)
    elif stats:
        guest = parse_guest_stats({"stats": stats}, ram_bytes=ram_bytes, now=now)
    else:
        # No balloon stats at all (no period set, or no balloon): nothing sent, nothing wrong.
        guest = GuestStats()
    return LibvirtMemoryStats(
        guest=guest, balloon_actual_bytes=actual, qemu_rss_bytes=rss, problems=tuple(problems)
    )
