"""Proxmox VE hosts: which VMs run, from the files Proxmox keeps, with no change to the VMs.

Proxmox starts each VM's QEMU with a QMP socket ``/var/run/qemu-server/VMID.qmp`` (which its
own tools connect to for each command, so reclaimd must poll it, never hold it), writes the pid
to ``/var/run/qemu-server/VMID.pid``, and keeps the configuration in
``/etc/pve/qemu-server/VMID.conf`` (the node's directory in the cluster filesystem). A VM is
found by its socket; its name, memory and balloon settings come from the configuration, its pid
from the pid file, believed only when that process's command line names the VM's socket or pid
file (a pid file can outlive its QEMU, and pids are reused).

Everything is read under a configurable ``root`` (``/`` on the host; e.g. ``/host`` in a
container that mounts the host's directories there), so tests can build the layout in a
temporary directory. The files are written by root on the host, but a VM's name and the
configuration's free text come from whoever may configure VMs: sizes and lengths are bounded.

The configuration format (``man qm.conf``): ``key: value`` lines, ``#`` lines for the
description, then ``[snapshot]``, ``[PENDING]`` and ``[special:...]`` sections, which are not
the running configuration and are skipped. ``memory`` is MiB, ``memory: 4096`` or, since
Proxmox VE 8.1, ``memory: current=4096``; ``balloon`` is the MiB the automatic ballooning may
shrink the VM to, 0 meaning no balloon device at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from daemon.untrusted import vm_name

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_MEMORY_MIB",
    "RUN_DIR",
    "ProxmoxConfig",
    "ProxmoxVM",
    "ProxmoxWatcher",
    "discover",
    "parse_vm_config",
]

#: Under ``root``.
CONFIG_DIR: Final = Path("etc/pve/qemu-server")
RUN_DIR: Final = Path("var/run/qemu-server")
#: Proxmox's default when a configuration has no ``memory``.
DEFAULT_MEMORY_MIB: Final = 512
MAX_CONFIG_BYTES: Final = 1024 * 1024
MAX_TEXT: Final = 256
MAX_CMDLINE: Final = 256 * 1024
MAX_VMS: Final = 10_000
# Proxmox's VMIDs: 100 to 999999999.
_VMID: Final = re.compile(r"[1-9][0-9]{2,8}")
_KEY: Final = re.compile(r"([a-z][a-z0-9_-]*):\s?(.*)")
_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
MiB: Final = 1 << 20


@dataclass(frozen=True)
class ProxmoxConfig:
    """The running configuration of one VM (``VMID.conf`` up to its first section).

    ``memory_mib``: as written (None: not written, Proxmox then gives
    :data:`DEFAULT_MEMORY_MIB`). ``balloon_mib``: the automatic ballooning's floor (None: not
    written, ballooning on with the floor at ``memory``; 0: no balloon device).
    ``uuid``: the SMBIOS UUID (``smbios1: uuid=...``). VMs are identified by VMID.
    """

    vmid: int
    name: str | None = None
    memory_mib: int | None = None
    balloon_mib: int | None = None
    shares: int | None = None
    uuid: str | None = None
    hugepages: str | None = None
    numa: bool | None = None
    agent: bool | None = None
    template: bool = False
    tags: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return (self.memory_mib if self.memory_mib is not None else DEFAULT_MEMORY_MIB) * MiB

    @property
    def has_balloon(self) -> bool:
        return self.balloon_mib != 0


@dataclass(frozen=True)
class ProxmoxVM:
    """A VM with a QMP socket: ``name`` from its configuration (else ``vmVMID``), ``pid`` when
    its QEMU runs (else None), ``config`` None when ``VMID.conf`` is missing or unreadable."""

    vmid: int
    name: str
    qmp_socket: Path
    pid: int | None
    config: ProxmoxConfig | None
    problems: tuple[str, ...] = ()


def _text(raw: str) -> str | None:
    clean = _CONTROL.sub(" ", raw).strip()
    return clean[:MAX_TEXT] or None


def _properties(value: str) -> tuple[str | None, dict[str, str]]:
    """A Proxmox property string ``[default=]a,key=value,...``: (the bare first value, keys)."""
    bare: str | None = None
    props: dict[str, str] = {}
    for i, part in enumerate(value.split(",")):
        key, sep, val = part.partition("=")
        if sep:
            props[key.strip()] = val.strip()
        elif i == 0:
            bare = part.strip()
    return bare, props


def _whole(raw: str | None, what: str, problems: list[str], limit: int = 2**40) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 13 or int(raw) > limit:
        problems.append(f"{what}: not a whole number: {raw[:40]!r}")
        return None
    return int(raw)


def _flag(raw: str | None, what: str, problems: list[str]) -> bool | None:
    if raw is None:
        return None
    if raw in ("1", "0"):
        return raw == "1"
    problems.append(f"{what}: not 0 or 1: {raw[:40]!r}")
    return None


def parse_vm_config(text: str, vmid: int) -> ProxmoxConfig:
    """Parse ``VMID.conf``; never raises on its content (problems are listed instead)."""
    problems: list[str] = []
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            break  # a snapshot, [PENDING] or [special:...]: not what runs
        if not line or line.startswith("#"):
            continue
        match = _KEY.fullmatch(line)
        if match is None:
            if len(problems) < 16:
                problems.append(f"not a 'key: value' line: {line[:60]!r}")
            continue
        values.setdefault(match.group(1), match.group(2).strip())

    memory_bare, memory_props = _properties(values.get("memory", ""))
    memory = memory_props.get("current", memory_bare) if "memory" in values else None
    agent_bare, agent_props = _properties(values.get("agent", ""))
    agent = agent_props.get("enabled", agent_bare) if "agent" in values else None
    _, smbios = _properties(values.get("smbios1", ""))
    uuid = smbios.get("uuid")
    if uuid is not None and not _UUID.fullmatch(uuid):
        problems.append(f"smbios1 uuid is not a UUID: {uuid[:40]!r}")
        uuid = None
    tags = tuple(
        t for t in (_text(tag) for tag in re.split(r"[;, ]+", values.get("tags", ""))) if t
    )
    return ProxmoxConfig(
        vmid=vmid,
        name=_text(values["name"]) if "name" in values else None,
        memory_mib=_whole(memory, "memory", problems),
        balloon_mib=_whole(values.get("balloon"), "balloon", problems),
        shares=_whole(values.get("shares"), "shares", problems, 50_000),
        uuid=uuid.lower() if uuid else None,
        hugepages=_text(values["hugepages"]) if "hugepages" in values else None,
        numa=_flag(values.get("numa"), "numa", problems),
        agent=_flag(agent, "agent", problems),
        template=values.get("template") == "1",
        tags=tags[:32],
        problems=tuple(problems),
    )


def _read_config(path: Path, vmid: int) -> tuple[ProxmoxConfig | None, str | None]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return None, f"{path.name}: {exc.strerror or exc}"
    if len(raw) > MAX_CONFIG_BYTES:
        return None, f"{path.name}: larger than {MAX_CONFIG_BYTES} bytes"
    return parse_vm_config(raw.decode("utf-8", "replace"), vmid), None


def _names_vm(proc: Path, pid: int, vmid: int) -> bool:
    """Whether process ``pid``'s command line names VMID's QMP socket or pid file."""
    try:
        with (proc / str(pid) / "cmdline").open("rb") as f:
            args = f.read(MAX_CMDLINE).split(b"\0")
    except OSError:
        return False
    marks = (f"/{vmid}.qmp".encode(), f"/{vmid}.pid".encode())
    # "path=/var/run/qemu-server/100.qmp,server=on,..." or "-pidfile /var/run/.../100.pid"
    return any(mark + b"," in arg or arg.endswith(mark) for arg in args for mark in marks)


def _read_pid(path: Path, proc: Path, vmid: int) -> tuple[int | None, str | None]:
    try:
        with path.open("rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None, f"{path.name} is missing: the VM is not running"
    except OSError as exc:
        return None, f"{path.name}: {exc.strerror or exc}"
    if not text.isdigit() or not 0 < int(text) < 2**22:
        return None, f"{path.name} does not hold a pid: {text[:20]!r}"
    pid = int(text)
    if not _names_vm(proc, pid, vmid):
        return None, f"{path.name}: process {pid} is not VM {vmid}'s QEMU (stale pid file)"
    return pid, None


def discover(root: Path = Path("/"), *, proc: Path = Path("/proc")) -> list[ProxmoxVM]:
    """Every VM with a QMP socket under ``root``, by VMID; blocking file I/O (call it in a
    worker thread from asyncio). A socket whose name is not a VMID is ignored."""
    run_dir = root / RUN_DIR
    config_dir = root / CONFIG_DIR
    vms: list[ProxmoxVM] = []
    with contextlib.suppress(OSError):
        sockets = sorted(run_dir.glob("*.qmp"))
        for socket in sockets[:MAX_VMS]:
            if not _VMID.fullmatch(socket.stem):
                continue
            vmid = int(socket.stem)
            config, config_problem = _read_config(config_dir / f"{vmid}.conf", vmid)
            pid, pid_problem = _read_pid(run_dir / f"{vmid}.pid", proc, vmid)
            name = config.name if config is not None and config.name else f"vm{vmid}"
            vms.append(
                ProxmoxVM(
                    vmid=vmid,
                    name=name,
                    qmp_socket=socket,
                    pid=pid,
                    config=config,
                    problems=tuple(p for p in (config_problem, pid_problem) if p),
                )
            )
    return sorted(vms, key=lambda vm: vm.vmid)


class ProxmoxWatcher:
    """Calls ``appeared(vm)`` and ``vanished(name)`` as Proxmox VMs' sockets come and go under
    ``root``; a VM whose name changed (its configuration was edited) vanishes and appears again
    under the new one. Names are unique: a second VM of a taken name is ``NAME-VMID``."""

    def __init__(
        self,
        root: Path,
        *,
        appeared: Callable[[ProxmoxVM], None],
        vanished: Callable[[str], None],
        interval: float = 2.0,
        proc: Path = Path("/proc"),
    ) -> None:
        self.root = root
        self.appeared = appeared
        self.vanished = vanished
        self.interval = interval
        self.proc = proc
        self.known: dict[int, ProxmoxVM] = {}  # by VMID

    def update(self, found: list[ProxmoxVM]) -> None:
        # Whoever may configure VMs names them: the characters of configured names only.
        now = {
            vm.vmid: dataclasses.replace(vm, name=vm_name(vm.name) or f"vm{vm.vmid}")
            for vm in found
        }
        for vmid, vm in list(self.known.items()):
            new = now.get(vmid)
            if new is None or new.qmp_socket != vm.qmp_socket or _base_name(new, vm):
                del self.known[vmid]
                self.vanished(vm.name)
        taken = {vm.name for vm in self.known.values()}
        for vmid, vm in sorted(now.items()):
            if vmid in self.known:
                continue
            if vm.name in taken:
                vm = dataclasses.replace(vm, name=f"{vm.name}-{vmid}")
            taken.add(vm.name)
            self.known[vmid] = vm
            self.appeared(vm)

    async def run(self) -> None:
        while True:
            self.update(await asyncio.to_thread(discover, self.root, proc=self.proc))
            await asyncio.sleep(self.interval)


def _base_name(new: ProxmoxVM, old: ProxmoxVM) -> bool:
    """Whether the VM's configured name changed (``old`` may carry a ``-VMID`` suffix)."""
    return old.name not in (new.name, f"{new.name}-{new.vmid}")
