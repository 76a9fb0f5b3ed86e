"""libvirt domains of the real test guest, for tests and benchmarks.

The domain boots the image ``daemon.testguest.build_image`` makes (Debian kernel + busybox
initramfs) under TCG (``type='qemu'``), as ``daemon.testguest.launch`` does under plain QEMU:
the console on the first serial port (a file), the guest's control channel on the second (a
Unix socket, so :class:`daemon.testguest.ControlChannel` drives it), a virtio balloon with free
page reporting and a 2 s stats period, and nothing QEMU-specific (no ``<qemu:commandline>``).
"""

from __future__ import annotations

import re
import shutil
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from daemon.testguest import ControlChannel, GuestImage
from tests.libvirt.libvirtd import PrivateLibvirtd

READY = re.compile(r"^RECLAIMD-GUEST: ready", re.MULTILINE)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    ram_mib: int = 256
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    free_page_reporting: bool = True
    stats_period: int | None = 2
    agent_channel: bool = False
    memfd: bool = False
    workload: str | None = None
    metadata: str | None = None  # raw XML children of <metadata>


def install_image(image: GuestImage, libvirtd: PrivateLibvirtd) -> tuple[Path, Path]:
    """Copy the guest's kernel and initrd where QEMU (libvirt-qemu) can read them."""
    kernel, initrd = libvirtd.images / "vmlinuz", libvirtd.images / "initrd.gz"
    for src, dst in ((image.kernel, kernel), (image.initrd, initrd)):
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
        dst.chmod(0o644)
    return kernel, initrd


def domain_xml(spec: DomainSpec, libvirtd: PrivateLibvirtd) -> str:
    sub = ET.SubElement
    dom = ET.Element("domain", type="qemu")
    sub(dom, "name").text = spec.name
    sub(dom, "uuid").text = spec.uuid
    if spec.metadata:
        dom.append(ET.fromstring(f"<metadata>{spec.metadata}</metadata>"))
    sub(dom, "memory", unit="MiB").text = str(spec.ram_mib)
    sub(dom, "currentMemory", unit="MiB").text = str(spec.ram_mib)
    if spec.memfd:
        backing = sub(dom, "memoryBacking")
        sub(backing, "source", type="memfd")
        sub(backing, "access", mode="shared")
    sub(dom, "vcpu").text = "1"
    os_ = sub(dom, "os")
    sub(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    sub(os_, "kernel").text = str(libvirtd.images / "vmlinuz")
    sub(os_, "initrd").text = str(libvirtd.images / "initrd.gz")
    cmdline = "console=ttyS0 panic=-1"
    if spec.workload:
        cmdline += f" reclaimd.workload={spec.workload}"
    sub(os_, "cmdline").text = cmdline
    cpu = sub(dom, "cpu", mode="custom", match="exact")
    sub(cpu, "model", fallback="allow").text = "qemu64"
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        sub(dom, event).text = "destroy"
    devices = sub(dom, "devices")
    sub(devices, "emulator").text = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    console = sub(devices, "serial", type="file")
    sub(console, "source", path=str(console_log(spec, libvirtd)))
    sub(console, "target", port="0")
    control = sub(devices, "serial", type="unix")
    sub(control, "source", mode="bind", path=str(control_socket(spec, libvirtd)))
    sub(control, "target", port="1")
    if spec.agent_channel:
        channel = sub(devices, "channel", type="unix")
        sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    balloon = sub(
        devices,
        "memballoon",
        model="virtio",
        freePageReporting="on" if spec.free_page_reporting else "off",
    )
    if spec.stats_period is not None:
        sub(balloon, "stats", period=str(spec.stats_period))
    return ET.tostring(dom, encoding="unicode")


def console_log(spec: DomainSpec, libvirtd: PrivateLibvirtd) -> Path:
    return libvirtd.console / f"{spec.name}.log"


def control_socket(spec: DomainSpec, libvirtd: PrivateLibvirtd) -> Path:
    return libvirtd.console / f"{spec.name}.ctl"


def define(spec: DomainSpec, libvirtd: PrivateLibvirtd) -> Path:
    """Define the domain (persistent, not started); returns its XML file."""
    path = libvirtd.root / f"{spec.name}.xml"
    path.write_text(domain_xml(spec, libvirtd))
    libvirtd.virsh("define", str(path))
    return path


def start(spec: DomainSpec, libvirtd: PrivateLibvirtd, *, paused: bool = False) -> None:
    console_log(spec, libvirtd).unlink(missing_ok=True)
    libvirtd.virsh("start", spec.name, *(["--paused"] if paused else []))


def wait_ready(
    spec: DomainSpec, libvirtd: PrivateLibvirtd, timeout: float = 180.0
) -> ControlChannel:
    """Wait until the guest's init is ready; its control channel, connected."""
    log = console_log(spec, libvirtd)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = log.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if READY.search(text):
            break
        if time.monotonic() > deadline:
            state = libvirtd.virsh("domstate", spec.name, check=False).strip()
            raise TimeoutError(
                f"{spec.name} not ready in {timeout:g} s (state {state}); console:\n"
                + "\n".join(text.splitlines()[-20:])
            )
        time.sleep(0.2)
    control = ControlChannel(control_socket(spec, libvirtd))
    control.connect()
    control.send("ping", timeout=10.0)
    return control


def dommemstat(libvirtd: PrivateLibvirtd, name: str) -> dict[str, int]:
    """``virsh dommemstat NAME`` as a dict (KiB, counts, epoch seconds)."""
    out = libvirtd.virsh("dommemstat", name)
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}
