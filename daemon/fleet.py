"""The in-memory state of every VM: the one thing the API reads.

Sessions write here as QMP events and polls arrive; ``api`` reads it to answer REST requests and
to build metric families at scrape time. Everything runs on one asyncio event loop, so a reader
always sees a consistent VM record without locks. A VM record is never reused across removals:
a vanished VM vanishes from the API and from ``/metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from daemon.guest_stats import GuestStats
from daemon.untrusted import one_line

if TYPE_CHECKING:
    # What the poll cycle publishes from the ledger: the fleet holds it but, at run time,
    # depends on nothing above it (the import contract in pyproject.toml ignores these).
    from daemon.ledger.advice import Advice
    from daemon.ledger.estimate import Estimate
    from daemon.ledger.ranges import RangeHistory
    from daemon.ledger.status import HostStatus

AttachKind = Literal["connect", "poll", "listen", "libvirt"]
#: ``VMState.last_error`` is at most this long: causes quote what a peer sent.
MAX_ERROR = 512


class SessionState(StrEnum):
    """The states a VM's monitor session goes through (the tables are in ``daemon.qmp.session``)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    ATTACHING = "attaching"
    RUNNING = "running"
    DISCONNECTED = "disconnected"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(frozen=True)
class VMOptions:
    """What the VM's own definition says about reclaiming it: ``[[vm]]`` in the config, or
    reclaimd's element in a libvirt domain's metadata (``source``; None: nothing said).
    ``reclaim`` False: the reclaim controller leaves the VM alone; ``minimum_bytes``: no
    balloon target below it unless forced (None: the daemon's ``balloon_min_bytes``)."""

    reclaim: bool = True
    minimum_bytes: int | None = None
    source: Literal["config", "libvirt metadata"] | None = None


@dataclass(frozen=True)
class AgentStatus:
    """The guest agent of a VM, as its last read went."""

    path: str
    ok: bool
    at: float | None  # when the last read was made
    problem: str | None = None  # absent, timeout, blocked, failed, bad-reply or rejected
    reason: str | None = None  # one line, for people
    reporting_order: int | None = None  # the guest's page_reporting_order, as it said
    free_by_order_bytes: tuple[int, ...] = ()  # its /proc/buddyinfo, all zones, as it said


@dataclass
class BalloonState:
    """What QMP tells about the VM's virtio-balloon device."""

    present: bool = False
    qom_path: str | None = None
    device_type: str | None = None
    actual_bytes: int | None = None
    target_bytes: int | None = None  # only known when reclaimd set it: QEMU has no query for it
    free_page_reporting: bool | None = None
    free_page_hint: bool | None = None
    deflate_on_oom: bool | None = None
    stats_polling_interval: int | None = None
    problem: str | None = None  # why a field above is unknown, e.g. "no balloon device"
    changes: int = 0  # BALLOON_CHANGE events taken in: a read begun before one is older


@dataclass
class MemoryLayout:
    """RAM as QEMU describes it at attach (and after MEMORY_DEVICE_SIZE_CHANGE)."""

    base_bytes: int | None = None
    plugged_bytes: int | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    memdevs: list[dict[str, Any]] = field(default_factory=list)
    ramblock_text: str | None = None  # x-query-ramblock, for the host view
    mtree_text: str | None = None  # "info mtree -f", for guest-physical addresses
    mem_paths: dict[str, str] = field(default_factory=dict)  # file backends: memdev id -> path

    @property
    def ram_bytes(self) -> int | None:
        if self.base_bytes is None:
            return None
        return self.base_bytes + (self.plugged_bytes or 0)


@dataclass
class VMState:
    """The latest known state of one VM."""

    name: str
    address: str
    attach: AttachKind
    session_state: SessionState = SessionState.IDLE
    up: bool = False
    state_since: float = field(default_factory=time.time)
    last_error: str | None = None
    attached_at: float | None = None
    last_poll: float | None = None
    reconnects: int = 0
    pid: int | None = None
    qemu_version: str | None = None
    qemu_package: str | None = None
    qemu_name: str | None = None
    uuid: str | None = None
    status: str | None = None
    running: bool | None = None
    memory: MemoryLayout = field(default_factory=MemoryLayout)
    balloon: BalloonState = field(default_factory=BalloonState)
    guest_stats: GuestStats | None = None
    guest_stats_error: str | None = None
    event_counts: dict[str, int] = field(default_factory=dict)
    last_event: str | None = None
    last_event_time: float | None = None
    events_dropped: int = 0
    # Published by the VM's poll cycle (daemon.vmcycle): the host view with the ledger's
    # counters, the reclaim estimate and the history of reported ranges.
    host: HostStatus | None = None
    estimate: Estimate | None = None
    ranges: RangeHistory | None = None
    agent: AgentStatus | None = None  # None: no guest agent known for this VM
    # Extra identity labels of qemu_vm_info (a libvirt domain's OpenStack Nova metadata).
    labels: dict[str, str] = field(default_factory=dict)
    advice: Advice | None = None  # the balloon advice, published with the estimate
    options: VMOptions = field(default_factory=VMOptions)

    def set_session_state(self, state: SessionState, error: str | None = None) -> None:
        if state != self.session_state:
            self.session_state = state
            self.state_since = time.time()
        self.up = state == SessionState.RUNNING
        if error is not None:
            self.last_error = one_line(error, MAX_ERROR)


class Fleet:
    """All VMs known to the daemon, by name."""

    def __init__(self) -> None:
        self._vms: dict[str, VMState] = {}

    def add(self, name: str, address: str, attach: AttachKind) -> VMState:
        """Register a VM, or return the existing record when the same VM re-registers."""
        # A socket's path may hold bytes that are not UTF-8 (escaped as surrogates): the
        # address is for display, so it is kept as valid text.
        address = one_line(address, 1024)
        vm = self._vms.get(name)
        if vm is None or vm.attach != attach or vm.address != address:
            vm = VMState(name=name, address=address, attach=attach)
            self._vms[name] = vm
        return vm

    def remove(self, name: str) -> None:
        self._vms.pop(name, None)

    def get(self, name: str) -> VMState | None:
        return self._vms.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._vms

    def __iter__(self) -> Iterator[VMState]:
        return iter(sorted(self._vms.values(), key=lambda vm: vm.name))

    def __len__(self) -> int:
        return len(self._vms)
