"""What only QMP tells about a libvirt domain, through ``virDomainQemuMonitorCommand``.

Off unless ``libvirt_qmp_passthrough`` is set: libvirt marks every domain a monitor command is
sent to as tainted ("custom-monitor" in the domain's log; libvirt no longer vouches for what it
knows of a domain whose QEMU was sent commands behind its back), so the session logs a warning
the first time for each domain. What is read, at attach, are the
facts the domain XML and libvirt's API cannot give, all by commands that only read:

- ``info mtree -f`` (HMP through ``human-monitor-command``): the flat memory map, so reported
  ranges get their guest-physical addresses as over a direct QMP connection;
- ``qom-get mem-path`` of each memory backend: the files behind file-backed guest RAM, so the
  host view matches their mappings by path rather than by size alone;
- ``qom-get free-page-hint`` of the balloon: whether free page hinting is on, which libvirt's
  XML has no attribute for.

Everything else still goes through libvirt's own API. A command QEMU refuses, a driver without
a QEMU monitor (``test:///``), or a reply of the wrong shape leaves that fact unknown, as over
QMP; the attach goes on.
"""

from __future__ import annotations

import logging

from daemon import libvirt as lv
from daemon.fleet import VMState
from daemon.qmp.connection import READ_LIMIT
from daemon.qmp.probe import MAX_PATH
from daemon.untrusted import clean_text

log = logging.getLogger(__name__)

#: Where QEMU puts a device with an id (libvirt gives every device one, its alias).
PERIPHERALS = "/machine/peripheral"


async def read_through_qmp(source: lv.LibvirtSource, uuid: str, vm: VMState) -> list[str]:
    """Read the facts above into ``vm``; what could not be read, one line each. Raises
    ``NotConnected`` or ``DomainNotRunning`` (the attach fails as for any other call) and
    ``Unsupported`` where the driver has no QEMU monitor."""
    problems: list[str] = []
    memory, balloon = vm.memory, vm.balloon
    try:
        mtree = await source.monitor_command(
            uuid, "human-monitor-command", {"command-line": "info mtree -f"}
        )
        memory.mtree_text = clean_text(mtree, READ_LIMIT) if isinstance(mtree, str) else None
        if memory.mtree_text is None:
            problems.append("info mtree -f: not text")
    except (lv.MonitorCommandFailed, lv.BadReply) as exc:
        memory.mtree_text = None
        problems.append(str(exc))
    memory.mem_paths = {}
    for memdev in memory.memdevs:
        backend = memdev.get("id")
        if not isinstance(backend, str):
            continue
        try:
            path = await source.monitor_command(
                uuid, "qom-get", {"path": f"/objects/{backend}", "property": "mem-path"}
            )
        except (lv.MonitorCommandFailed, lv.BadReply):
            continue  # not a file backend (ram, memfd)
        # A path the host view cannot open as it is (cut, or not valid text) is not kept.
        if isinstance(path, str) and path and path == clean_text(path, MAX_PATH):
            memory.mem_paths[backend] = path
    if balloon.present and balloon.qom_path:
        try:
            hint = await source.monitor_command(
                uuid,
                "qom-get",
                {"path": f"{PERIPHERALS}/{balloon.qom_path}", "property": "free-page-hint"},
            )
            balloon.free_page_hint = hint if isinstance(hint, bool) else None
        except (lv.MonitorCommandFailed, lv.BadReply) as exc:
            balloon.free_page_hint = None
            problems.append(str(exc))
    return problems
