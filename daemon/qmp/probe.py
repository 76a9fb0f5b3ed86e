"""What reclaimd reads from a VM over QMP: at attach, after memory events, and every poll.

Every function takes a connected ``QMPConnection`` and writes what it learns into a ``VMState``.
Replies are checked for shape: a QEMU that answers nonsense gets a recorded problem, not a crash.
A command that a QEMU lacks (``CommandNotFound``) leaves its fields unknown with the reason.

Replies are untrusted and are cleaned where they enter (``daemon.untrusted``): text becomes
valid and bounded, sizes must be integers in [0, 2^63) (RAM) or [0, RAM] (the balloon), and
structures are bounded copies. What QEMU itself decides and cannot be right otherwise (the
RAM size, the run state) fails the attach with ``BadReply`` when it is malformed; what the guest
moves (the balloon) is kept unknown with the problem recorded, and the session goes on.
"""

from __future__ import annotations

import time
from typing import Any

from daemon.fleet import VMState
from daemon.guest_stats import GuestStats, parse_guest_stats
from daemon.qmp.connection import READ_LIMIT, QMPConnection
from daemon.qmp.errors import BadReply, CommandFailed
from daemon.untrusted import (
    MAX_INT,
    ZERO_UUID,
    bad_size,
    bounded_int,
    clean_json,
    clean_text,
    describe,
    one_line,
    text_or_none,
)

# QOM types of virtio-balloon front ends; the device path depends on its id (or lack of one).
BALLOON_TYPES = frozenset(
    {
        "virtio-balloon-pci",
        "virtio-balloon-pci-transitional",
        "virtio-balloon-pci-non-transitional",
        "virtio-balloon-ccw",
        "virtio-balloon-device",
    }
)
BALLOON_PARENTS = ("/machine/peripheral", "/machine/peripheral-anon")
MAX_NAME = 128  # -name, QOM names, memory backend ids
MAX_UUID = 64
MAX_STATUS = 32
MAX_DEVICES = 256  # memory devices and backends: QEMU allows 256 DIMM slots
MAX_PATH = 4096
#: guest-stats-polling-interval is a number of seconds.
MAX_STATS_INTERVAL = 2**31 - 1


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadReply(f"{what}: expected an object, got {describe(value)}")
    return value


def _size(value: Any, what: str, high: int = MAX_INT) -> int:
    size = bounded_int(value, 0, high)
    if size is None:
        raise BadReply(f"{what}: {bad_size(value, high)}")
    return size


async def read_identity(conn: QMPConnection, vm: VMState) -> None:
    """Version (from the greeting), name, uuid and run state."""
    vm.qemu_version, vm.qemu_package = conn.qemu_version
    vm.pid = conn.peer_pid if conn.peer_pid is not None else vm.pid
    name = _dict(await conn.execute("query-name"), "query-name")
    vm.qemu_name = text_or_none(name.get("name"), MAX_NAME)
    uuid = _dict(await conn.execute("query-uuid"), "query-uuid")
    raw = text_or_none(uuid.get("UUID"), MAX_UUID)
    vm.uuid = None if raw == ZERO_UUID else raw  # QEMU's default when -uuid is not given
    await read_status(conn, vm)


async def read_status(conn: QMPConnection, vm: VMState) -> None:
    status = _dict(await conn.execute("query-status"), "query-status")
    text = status.get("status", "unknown")
    if not isinstance(text, str):
        raise BadReply(f"query-status status: expected a string, got {describe(text)}")
    vm.status = one_line(text, MAX_STATUS)
    vm.running = status.get("running") is True


async def read_memory(conn: QMPConnection, vm: VMState) -> None:
    """RAM size, memory devices (DIMMs, virtio-mem) and memory backends."""
    summary = _dict(await conn.execute("query-memory-size-summary"), "query-memory-size-summary")
    base = _size(summary.get("base-memory"), "base-memory")
    plugged = summary.get("plugged-memory")
    # Together under 2^63 too: every size the VM reports later is bounded by their sum.
    vm.memory.plugged_bytes = (
        _size(plugged, "plugged-memory", MAX_INT - base) if plugged is not None else None
    )
    vm.memory.base_bytes = base
    for command, attr in (("query-memory-devices", "devices"), ("query-memdev", "memdevs")):
        try:
            reply = await conn.execute(command)
        except CommandFailed:
            reply = []
        items = reply[:MAX_DEVICES] if isinstance(reply, list) else []
        setattr(vm.memory, attr, [clean_json(d) for d in items if isinstance(d, dict)])


async def read_ram_layout(conn: QMPConnection, vm: VMState) -> None:
    """RAM blocks and the flat memory tree, as text: the host view locates guest RAM with them."""
    try:
        reply = await conn.execute("x-query-ramblock")
        text = reply.get("human-readable-text") if isinstance(reply, dict) else None
        # Block names from here are served with reported ranges: valid text.
        vm.memory.ramblock_text = clean_text(text, READ_LIMIT) if isinstance(text, str) else None
    except CommandFailed:
        vm.memory.ramblock_text = None  # QEMU < 6.2 has no x-query-ramblock
    try:
        mtree = await conn.execute("human-monitor-command", {"command-line": "info mtree -f"})
        vm.memory.mtree_text = clean_text(mtree, READ_LIMIT) if isinstance(mtree, str) else None
    except CommandFailed:
        vm.memory.mtree_text = None
    vm.memory.mem_paths = {}
    for memdev in vm.memory.memdevs:
        backend = memdev.get("id")
        if not isinstance(backend, str):
            continue
        try:
            path = await conn.execute(
                "qom-get", {"path": f"/objects/{backend}", "property": "mem-path"}
            )
        except CommandFailed:
            continue  # not a file backend (ram, memfd) or not an object path
        # A path the host view cannot open as it is (cut, or not valid text) is not kept.
        if isinstance(path, str) and path and path == clean_text(path, MAX_PATH):
            vm.memory.mem_paths[backend] = path


async def find_balloon(conn: QMPConnection) -> tuple[str, str] | None:
    """(QOM path, type) of the first virtio-balloon device, found by type, not by assumed id."""
    for parent in BALLOON_PARENTS:
        try:
            entries = await conn.execute("qom-list", {"path": parent})
        except CommandFailed:
            continue
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            kind, name = entry.get("type"), text_or_none(entry.get("name"), MAX_NAME)
            device = kind[6:-1] if isinstance(kind, str) and kind.startswith("child<") else ""
            if name and device in BALLOON_TYPES:
                return f"{parent}/{name}", device
    return None


async def read_balloon(conn: QMPConnection, vm: VMState, *, stats_interval: int) -> None:
    """Locate the balloon, read its properties, and turn on stats polling if asked to."""
    balloon = vm.balloon
    found = await find_balloon(conn)
    if found is None:
        balloon.present = False
        balloon.problem = "no virtio-balloon device"
        return
    balloon.present = True
    balloon.problem = None
    balloon.qom_path, balloon.device_type = found
    for prop in ("free-page-reporting", "free-page-hint", "deflate-on-oom"):
        try:
            value = await conn.execute("qom-get", {"path": balloon.qom_path, "property": prop})
        except CommandFailed:
            value = None  # older QEMUs lack some of these properties
        setattr(balloon, prop.replace("-", "_"), value if isinstance(value, bool) else None)
    interval = await conn.execute(
        "qom-get", {"path": balloon.qom_path, "property": "guest-stats-polling-interval"}
    )
    balloon.stats_polling_interval = _size(
        interval, "guest-stats-polling-interval", MAX_STATS_INTERVAL
    )
    if balloon.stats_polling_interval == 0 and stats_interval > 0:
        await conn.execute(
            "qom-set",
            {
                "path": balloon.qom_path,
                "property": "guest-stats-polling-interval",
                "value": stats_interval,
            },
        )
        balloon.stats_polling_interval = stats_interval


async def read_balloon_actual(conn: QMPConnection, vm: VMState) -> None:
    """``query-balloon``; fails with DeviceNotActive when there is no balloon device."""
    if not vm.balloon.present:
        return
    try:
        reply = await conn.execute("query-balloon")
    except CommandFailed as exc:
        vm.balloon.problem = str(exc)
        return
    # QEMU computes actual from a size the guest writes: a hostile guest moves it anywhere.
    raw = reply.get("actual") if isinstance(reply, dict) else reply
    actual = bounded_int(raw, 0, vm.memory.ram_bytes or MAX_INT)
    if actual is None:
        vm.balloon.actual_bytes = None
        vm.balloon.problem = (
            f"query-balloon actual: {bad_size(raw, vm.memory.ram_bytes or MAX_INT)}"
        )
        return
    vm.balloon.actual_bytes = actual
    vm.balloon.problem = None


async def read_guest_stats(conn: QMPConnection, vm: VMState) -> None:
    """``qom-get guest-stats``: untrusted guest data, parsed and checked before it is kept."""
    if not vm.balloon.present or vm.balloon.qom_path is None:
        vm.guest_stats_error = vm.balloon.problem or "no virtio-balloon device"
        return
    try:
        reply = await conn.execute(
            "qom-get", {"path": vm.balloon.qom_path, "property": "guest-stats"}
        )
    except CommandFailed as exc:
        vm.guest_stats_error = str(exc)
        return
    keep_guest_stats(vm, parse_guest_stats(reply, ram_bytes=vm.memory.ram_bytes, now=time.time()))


def keep_guest_stats(vm: VMState, stats: GuestStats) -> None:
    """Keep parsed guest statistics on the VM, with why they cannot be used when so."""
    vm.guest_stats = stats
    if not stats.available:
        vm.guest_stats_error = "guest has not reported statistics yet (driver not loaded?)"
    elif not stats.valid:
        vm.guest_stats_error = "rejected: " + "; ".join(stats.problems)
    else:
        vm.guest_stats_error = None


async def attach(conn: QMPConnection, vm: VMState, *, stats_interval: int) -> None:
    """Everything read once when a session (re)attaches; the first poll reads the rest."""
    await read_identity(conn, vm)
    await read_memory(conn, vm)
    await read_ram_layout(conn, vm)
    await read_balloon(conn, vm, stats_interval=stats_interval)


async def poll(conn: QMPConnection, vm: VMState) -> None:
    """Everything read each poll cycle: what changes between polls."""
    await read_balloon_actual(conn, vm)
    await read_guest_stats(conn, vm)
    vm.last_poll = time.time()
