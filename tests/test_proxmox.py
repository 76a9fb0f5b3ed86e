"""Proxmox discovery: VMs from the files Proxmox keeps, under a temporary root."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.proxmox import (
    CONFIG_DIR,
    RUN_DIR,
    ProxmoxConfig,
    ProxmoxVM,
    ProxmoxWatcher,
    discover,
    parse_vm_config,
)

MiB = 1 << 20

# What Proxmox VE writes (qm config 101 on PVE 8), with a snapshot and pending changes after it.
CONFIG = """\
#Web server%0Asecond line of the description
agent: enabled=1,fstrim_cloned_disks=1
balloon: 1024
boot: order=scsi0;ide2;net0
cores: 2
hugepages: 2
memory: current=4096
meta: creation-qemu=8.1.2,ctime=1700000000
name: web-1
net0: virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1
numa: 1
ostype: l26
scsi0: local-lvm:vm-101-disk-0,iothread=1,size=32G
shares: 500
smbios1: uuid=2FE7ED89-BAFA-4C28-B209-38288AEB803D
tags: prod;web
vmgenid: 94309b84-54d9-404c-a15a-5a5b4459fc3a

[before-upgrade]
memory: 2048
name: old-name
snaptime: 1690000000

[PENDING]
memory: 8192
"""


def test_parse_a_real_configuration() -> None:
    config = parse_vm_config(CONFIG, 101)
    assert config == ProxmoxConfig(
        vmid=101,
        name="web-1",
        memory_mib=4096,
        balloon_mib=1024,
        shares=500,
        uuid="2fe7ed89-bafa-4c28-b209-38288aeb803d",
        hugepages="2",
        numa=True,
        agent=True,
        tags=("prod", "web"),
    )
    assert config.memory_bytes == 4096 * MiB and config.has_balloon


def test_defaults_and_the_older_memory_syntax() -> None:
    config = parse_vm_config("memory: 2048\nballoon: 0\nagent: 0\n", 100)
    assert (config.memory_mib, config.balloon_mib, config.agent) == (2048, 0, False)
    assert not config.has_balloon  # balloon 0: no balloon device
    empty = parse_vm_config("", 100)
    assert empty.name is None and empty.memory_mib is None and empty.balloon_mib is None
    assert empty.memory_bytes == 512 * MiB and empty.has_balloon
    assert empty.problems == ()


def test_bad_lines_and_values_are_problems_not_crashes() -> None:
    config = parse_vm_config(
        "memory: lots\nballoon: -1\nnuma: yes\nsmbios1: uuid=nope\nthis is not a line\n"
        f"name: {'x' * 1000}\x01\n",
        100,
    )
    assert (config.memory_mib, config.balloon_mib, config.numa, config.uuid) == (None,) * 4
    assert len(config.problems) == 5, config.problems
    assert config.name is not None and len(config.name) == 256


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / CONFIG_DIR).mkdir(parents=True)
    (tmp_path / RUN_DIR).mkdir(parents=True)
    return tmp_path


@pytest.fixture
def fake_qemu(root: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line names VM 100's socket and pid file, as Proxmox's QEMU's."""
    run = root / RUN_DIR
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-id", "100",
         "-chardev", f"socket,id=qmp,path={run}/100.qmp,server=on,wait=off",
         "-pidfile", f"{run}/100.pid"]
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while b"-pidfile" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_discover_the_layout(root: Path, fake_qemu: subprocess.Popen[bytes]) -> None:
    run, conf = root / RUN_DIR, root / CONFIG_DIR
    # 100: running. 101: a socket left by a crashed VM (pid file gone). 102: stale pid file.
    # 103: socket but no configuration. "qmeventd.qmp" and "1.qmp" are not VMIDs.
    for name in ("100.qmp", "101.qmp", "102.qmp", "103.qmp", "qmeventd.qmp", "1.qmp"):
        (run / name).touch()
    (run / "100.pid").write_text(f"{fake_qemu.pid}\n")
    (run / "102.pid").write_text("1\n")
    (conf / "100.conf").write_text(CONFIG.replace("name: web-1", "name: db-1"))
    (conf / "101.conf").write_text("memory: 1024\n")
    (conf / "102.conf").write_text("name: stale\n")

    vms = {vm.vmid: vm for vm in discover(root)}
    assert sorted(vms) == [100, 101, 102, 103]
    running = vms[100]
    assert (running.name, running.pid, running.qmp_socket) == (
        "db-1",
        fake_qemu.pid,
        run / "100.qmp",
    )
    assert running.config is not None and running.config.memory_mib == 4096
    assert running.problems == ()
    assert vms[101].pid is None and vms[101].name == "vm101"
    assert any("not running" in p for p in vms[101].problems)
    assert vms[102].pid is None and any("stale" in p for p in vms[102].problems)
    assert vms[103].config is None and any("103.conf" in p for p in vms[103].problems)


def test_an_empty_or_missing_root(tmp_path: Path) -> None:
    assert discover(tmp_path) == []
    assert discover(tmp_path / "nothing-here") == []


def test_an_oversized_configuration_is_not_read(root: Path) -> None:
    (root / RUN_DIR / "100.qmp").touch()
    (root / CONFIG_DIR / "100.conf").write_text("#" * (2 * MiB))
    (vm,) = discover(root)
    assert vm.config is None and any("larger than" in p for p in vm.problems)


def _vm(vmid: int, name: str, root: Path = Path("/r")) -> ProxmoxVM:
    return ProxmoxVM(vmid, name, root / RUN_DIR / f"{vmid}.qmp", None, None)


def test_the_watcher_follows_sockets_and_names() -> None:
    events: list[tuple[str, str]] = []
    watcher = ProxmoxWatcher(
        Path("/r"),
        appeared=lambda vm: events.append(("+", vm.name)),
        vanished=lambda name: events.append(("-", name)),
    )
    watcher.update([_vm(100, "web"), _vm(101, "web"), _vm(102, "bad name/../x")])
    # Unique, and of the characters configured names may have.
    assert events == [("+", "web"), ("+", "web-101"), ("+", "bad_name_.._x")]
    events.clear()
    watcher.update([_vm(100, "web"), _vm(101, "web"), _vm(102, "bad name/../x")])
    assert events == []  # nothing changed, nothing said
    watcher.update([_vm(101, "web"), _vm(102, "db")])
    assert events == [("-", "web"), ("-", "bad_name_.._x"), ("+", "db")]
