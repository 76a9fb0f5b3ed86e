"""The host's view of a VM's guest RAM, read from ``/proc`` (no QMP, no asyncio).

- ``peercred``: QEMU's pid from the QMP socket (SO_PEERCRED).
- ``ramblocks``: ``x-query-ramblock`` parsing; which RAM blocks are guest RAM.
- ``mtree``: ``info mtree -f`` parsing; RAM-block offset -> guest-physical address.
- ``maps``: ``/proc/PID/maps`` matched to guest-RAM blocks, with the rule that matched.
- ``residency``: PAGEMAP_SCAN, ``/proc/PID/pagemap`` and SEEK_DATA scanners -> ``Snapshot``.
- ``bitmap``: the packed page bitmaps snapshots are made of.
- ``view``: ``HostView``, which ties these together for one QEMU process.
- ``cadence``: when to scan next, within a CPU budget.
- ``unavailable``: ``Unavailable``, the typed reason a view is missing.
"""
