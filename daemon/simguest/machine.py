"""What QMP sees of one simulated VM: identity, run state, memory layout, balloon and QOM tree.

The machine looks like ``qemu-system-x86_64 -M pc,memory-backend=ram0 -object
memory-backend-memfd,id=ram0,size=R -device virtio-balloon-pci,id=balloon0,...``: one memfd
RAM block, no DIMMs, one balloon.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.simguest import qom
from daemon.simguest.balloon import BalloonDevice
from daemon.simguest.events import EventBus

QEMU_VERSION = (7, 2, 0)
MACHINE_TYPE = "pc-i440fx-7.2-machine"
MEMDEV_TYPE = "memory-backend-memfd"
# How long a guest takes to act on the ACPI power button before it powers off.
ACPI_SHUTDOWN_SECONDS = 0.5


@dataclass(frozen=True)
class MachineConfig:
    name: str
    ram_bytes: int
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    memdev_id: str = "ram0"
    balloon_id: str = "balloon0"
    free_page_reporting: bool = True
    deflate_on_oom: bool = False
    version: tuple[int, int, int] = QEMU_VERSION
    package: str = ""

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0 or self.ram_bytes % (2 << 20):
            raise ValueError("ram_bytes must be a positive multiple of 2 MiB")


class VirtualClock:
    """QEMU_CLOCK_VIRTUAL: monotonic seconds that stand still while the VM is paused."""

    def __init__(self, source: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._offset = source()
        self._paused_at: float | None = None

    def now(self) -> float:
        at = self._paused_at if self._paused_at is not None else self._source()
        return at - self._offset

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._source()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._offset += self._source() - self._paused_at
            self._paused_at = None


class Machine:
    """Run state and lifecycle; ``on_exit`` is called when QEMU would exit (quit, shutdown).

    ``start_paused`` is QEMU's ``-S``: the machine waits in ``prelaunch`` until ``cont``, and
    ``stop`` before then changes nothing.
    """

    def __init__(
        self,
        config: MachineConfig,
        events: EventBus,
        *,
        clock: VirtualClock | None = None,
        wall_clock: Callable[[], float] = time.time,
        start_paused: bool = False,
    ) -> None:
        self.config = config
        self.events = events
        self.clock = clock or VirtualClock()
        self.status = "running"
        if start_paused:
            self.status = "prelaunch"
            self.clock.pause()
        self.on_exit: Callable[[], None] = lambda: None
        self.on_reset: Callable[[], None] = lambda: None
        self.on_start: Callable[[], None] = lambda: None  # first run after ``-S``
        # How the guest's own reactions are delayed (``loop.call_later`` when running).
        self.defer: Callable[[float, Callable[[], None]], object] = lambda _delay, fn: fn()
        self.balloon = BalloonDevice(
            config.ram_bytes,
            events,
            free_page_reporting=config.free_page_reporting,
            deflate_on_oom=config.deflate_on_oom,
            wall_clock=wall_clock,
        )
        self.qom = self._build_qom()

    @property
    def running(self) -> bool:
        return self.status == "running"

    def stop(self) -> None:
        if self.running:
            self.status = "paused"
            self.clock.pause()
            self.events.emit("STOP")

    def cont(self) -> None:
        if self.status in ("paused", "prelaunch"):
            first = self.status == "prelaunch"
            self.status = "running"
            self.clock.resume()
            self.events.emit("RESUME")
            if first:
                self.on_start()

    def reset(self, *, guest: bool, reason: str) -> None:
        self.events.emit("RESET", {"guest": guest, "reason": reason})
        self.on_reset()

    def powerdown(self) -> None:
        """ACPI power button: the guest shuts itself down, and QEMU exits."""
        self.events.emit("POWERDOWN")
        self.defer(
            ACPI_SHUTDOWN_SECONDS, lambda: self.shutdown(guest=True, reason="guest-shutdown")
        )

    def shutdown(self, *, guest: bool, reason: str) -> None:
        if self.status == "shutdown":
            return
        self.status = "shutdown"
        self.clock.pause()
        self.events.emit("SHUTDOWN", {"guest": guest, "reason": reason})
        self.on_exit()

    def memdev(self) -> dict[str, object]:
        return {
            "share": True,
            "reserve": True,
            "prealloc": False,
            "host-nodes": [],
            "size": self.config.ram_bytes,
            "merge": True,
            "dump": True,
            "policy": "default",
            "id": self.config.memdev_id,
        }

    def ramblock_text(self) -> str:
        """``x-query-ramblock``: the RAM block, then the firmware blocks QEMU places after it."""
        ram = self.config.ram_bytes
        rows = [
            (self.config.memdev_id, 0, ram, ram),
            ("/rom@etc/acpi/tables", ram + 0x80000, 0x20000, 0x200000),
            ("pc.bios", ram, 0x40000, 0x40000),
            ("pc.rom", ram + 0x40000, 0x20000, 0x20000),
            ("/rom@etc/table-loader", ram + 0x280000, 0x1000, 0x10000),
            ("/rom@etc/acpi/rsdp", ram + 0x2C0000, 0x1000, 0x1000),
        ]
        lines = [f"{'Block Name':>24} {'PSize':>8}  {'Offset':>18} {'Used':>18} {'Total':>18}"]
        lines += [f"{n:>24} {'4 KiB':>8}  0x{o:016x} 0x{u:016x} 0x{t:016x}" for n, o, u, t in rows]
        return "\n".join(lines) + "\n"

    def _build_qom(self) -> qom.QOMTree:
        cfg = self.config
        memdev = qom.QOMObject(
            MEMDEV_TYPE,
            [
                qom.Prop("share", "bool", get=lambda: True),
                qom.Prop("size", "int", get=lambda: cfg.ram_bytes),
                qom.Prop("dump", "bool", get=lambda: True),
                qom.Prop("prealloc", "bool", get=lambda: False),
                qom.Prop("reserve", "bool", get=lambda: True),
                qom.Prop("merge", "bool", get=lambda: True),
                qom.Prop("hugetlb", "bool", get=lambda: False),
                qom.Prop("seal", "bool", get=lambda: True),
                qom.Prop("hugetlbsize", "int", get=lambda: 0),
                qom.Prop("policy", "HostMemPolicy", get=lambda: "default"),
                qom.Prop("host-nodes", "int", get=lambda: []),
            ],
        )
        machine = qom.QOMObject(
            MACHINE_TYPE,
            [qom.read_only("memory-backend", "link<memory-backend>", f"/objects/{cfg.memdev_id}")],
        )
        tree = qom.QOMTree(qom.QOMObject("container"))
        tree.add("/", "objects", qom.container())
        tree.add("/", "machine", machine)
        tree.add("/", "chardevs", qom.container())
        tree.add("/objects", cfg.memdev_id, memdev)
        tree.add("/machine", "unattached", qom.container())
        tree.add("/machine", "peripheral-anon", qom.container())
        tree.add("/machine", "peripheral", qom.container())
        balloon = self.balloon.qom_objects(cfg.balloon_id, self.clock.now)
        tree.add("/machine/peripheral", cfg.balloon_id, balloon)
        return tree
