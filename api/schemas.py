"""Response and request models of the REST API (JSON, versioned under /api/v1).

Byte quantities are integers in bytes, times are seconds since the epoch, ages are seconds.
A value that is unknown is ``null``, and where it matters a ``*_problem`` field says why.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, create_model

from daemon.fleet import VMState
from daemon.guest_stats import STATS, GuestStats


class Health(BaseModel):
    status: str = Field(description="ok when the daemon runs")
    version: str
    vms: int = Field(description="VMs known")
    vms_up: int = Field(description="VMs whose QMP session is up")


class Readiness(BaseModel):
    status: Literal["ready"] = Field(
        description="ready: configuration loaded, every VM's first attach attempt made"
    )
    vms: int = Field(description="VMs known")
    vms_up: int = Field(description="VMs whose QMP session is up")


class Balloon(BaseModel):
    present: bool
    qom_path: str | None
    device_type: str | None
    actual_bytes: int | None = Field(description="memory the guest has now (RAM minus balloon)")
    target_bytes: int | None = Field(
        description="last target set through reclaimd; null if unknown"
    )
    free_page_reporting: bool | None
    free_page_hint: bool | None
    deflate_on_oom: bool | None
    stats_polling_interval: int | None
    problem: str | None


class Memory(BaseModel):
    ram_bytes: int | None = Field(description="base plus plugged memory")
    base_bytes: int | None
    plugged_bytes: int | None
    devices: list[dict[str, Any]]
    memdevs: list[dict[str, Any]]


class _StatsHead(BaseModel):
    valid: bool = Field(description="false when the values were impossible and are withheld")
    problems: list[str]
    last_update: float | None
    age_seconds: float | None


# One field per guest statistic, from the statistics table (daemon.guest_stats.STATS).
if TYPE_CHECKING:
    _StatValues = _StatsHead
else:
    _StatValues = create_model(
        "StatValues",
        __base__=_StatsHead,
        **{
            s.field: (int | None, Field(description=f"{s.help}; {s.kind}, {s.unit}")) for s in STATS
        },
    )


class Stats(_StatValues):
    """Guest statistics from the virtio-balloon driver: untrusted, checked before serving."""

    @classmethod
    def from_stats(cls, stats: GuestStats, now: float) -> Stats:
        # Never serve numbers that were rejected.
        values = {s.field: getattr(stats, s.field) if stats.valid else None for s in STATS}
        return cls(
            valid=stats.valid,
            problems=list(stats.problems),
            last_update=stats.last_update,
            age_seconds=stats.age(now),
            **values,
        )


class VMSummary(BaseModel):
    name: str
    up: bool
    attach: str = Field(description="connect, poll or listen")
    session_state: str
    last_error: str | None
    qemu_version: str | None
    status: str | None
    ram_bytes: int | None
    balloon_actual_bytes: int | None
    guest_free_bytes: int | None
    guest_available_bytes: int | None
    stats_age_seconds: float | None
    host_resident_bytes: int | None = Field(
        description="guest RAM the host backs now (what the VM really costs the host)"
    )

    @classmethod
    def from_state(cls, vm: VMState, now: float | None = None) -> VMSummary:
        now = time.time() if now is None else now
        stats = vm.guest_stats if vm.guest_stats is not None and vm.guest_stats.valid else None
        return cls(
            name=vm.name,
            up=vm.up,
            attach=vm.attach,
            session_state=vm.session_state,
            last_error=vm.last_error,
            qemu_version=vm.qemu_version,
            status=vm.status,
            ram_bytes=vm.memory.ram_bytes,
            balloon_actual_bytes=vm.balloon.actual_bytes,
            guest_free_bytes=stats.free_bytes if stats else None,
            guest_available_bytes=stats.available_bytes if stats else None,
            stats_age_seconds=stats.age(now) if stats else None,
            host_resident_bytes=(
                vm.host.ledger.resident_bytes if vm.host and vm.host.ledger else None
            ),
        )


class ComponentOut(BaseModel):
    bytes: int | None
    source: Literal["observed", "agent", "modelled"] = Field(
        description="observed (QMP, host view), agent (the guest's own free lists) or "
        "modelled (the free split replayed into the allocator model)"
    )
    age_seconds: float | None = Field(description="age of the oldest input")
    reason: str | None = Field(description="why bytes is null, or a caveat")
    residual_bytes: int | None = Field(
        default=None, description="modelled or agent: how far the split was off at its last check"
    )


class OrderRowOut(BaseModel):
    order: int
    free_bytes: int = Field(description="free memory in blocks of exactly this order")
    returned_bytes: int = Field(
        description="free resident memory that reporting at this order would return"
    )


class InputsOut(BaseModel):
    stats_at: float | None = Field(description="guest stats' last-update")
    host_at: float | None = Field(description="the host scan combined with them")
    agent_at: float | None = Field(description="the guest agent's read of its free lists")
    skew_seconds: float | None = Field(description="how far apart stats and scan are")


class WhatIfOut(BaseModel):
    order: int
    reporting_order: int
    extra_reportable_bytes: int | None = Field(
        description="what reporting at this order would return beyond the guest's own order"
    )
    pending_report_seconds: float | None
    source: Literal["observed", "agent", "modelled"]
    reason: str | None


class EstimateOut(BaseModel):
    """The reclaim estimate of one VM (see the README's table of components)."""

    at: float
    ram_bytes: int | None
    margin_bytes: int
    reporting_enabled: bool | None
    reporting_effective: bool | None
    reporting_note: str | None = Field(description="the evidence behind the verdict")
    components: dict[str, ComponentOut]
    verdict: Literal["effective", "slow", "stalled", "ineffective", "off", "unknown"]
    reporting_order: int | None = Field(description="the guest's page_reporting_order")
    pending_report_seconds: float | None = Field(
        description="until upstream reporting has returned what is reportable now (predicted)"
    )
    report_due_at: float | None = Field(
        description="when upstream reporting will have returned the memory the guest freed last "
        "(predicted, epoch seconds)"
    )
    by_order: list[OrderRowOut] = Field(description="the free split, order 0..10")
    inputs: InputsOut


class EstimatePage(BaseModel):
    vm: str
    estimate: EstimateOut | None
    problem: str | None = Field(description="why there is no estimate yet")
    what_if: WhatIfOut | None = Field(
        default=None, description="with ?order=N: reporting at another page_reporting_order"
    )


class AgentOut(BaseModel):
    """The VM's guest agent, as its last read of the guest's free lists went."""

    path: str = Field(description="the agent's socket")
    ok: bool
    at: float | None = Field(description="when the last read was made")
    problem: Literal["absent", "timeout", "blocked", "failed", "bad-reply", "rejected"] | None
    reason: str | None
    reporting_order: int | None = Field(
        description="the guest's page_reporting_order (11: no reporting device registered)"
    )
    free_by_order_bytes: list[int] = Field(
        description="the guest's /proc/buddyinfo as its agent read it, all zones, in bytes"
    )


class VMDetail(VMSummary):
    address: str
    state_since: float
    attached_at: float | None
    last_poll: float | None
    reconnects: int
    pid: int | None
    qemu_package: str | None
    qemu_name: str | None
    uuid: str | None
    running: bool | None
    memory: Memory
    balloon: Balloon
    guest_stats: Stats | None
    guest_stats_problem: str | None
    event_counts: dict[str, int]
    last_event: str | None
    events_dropped: int
    host: dict[str, Any] | None = Field(
        default=None, description="host view of guest RAM (residency), when available"
    )
    estimate: EstimateOut | None = Field(
        default=None, description="the reclaim estimate, when available"
    )
    agent: AgentOut | None = Field(
        default=None, description="the guest agent, when the VM has one reclaimd knows of"
    )

    @classmethod
    def from_state(cls, vm: VMState, now: float | None = None) -> VMDetail:
        now = time.time() if now is None else now
        summary = VMSummary.from_state(vm, now).model_dump()
        return cls(
            **summary,
            address=vm.address,
            state_since=vm.state_since,
            attached_at=vm.attached_at,
            last_poll=vm.last_poll,
            reconnects=vm.reconnects,
            pid=vm.pid,
            qemu_package=vm.qemu_package,
            qemu_name=vm.qemu_name,
            uuid=vm.uuid,
            running=vm.running,
            memory=Memory(
                ram_bytes=vm.memory.ram_bytes,
                base_bytes=vm.memory.base_bytes,
                plugged_bytes=vm.memory.plugged_bytes,
                devices=vm.memory.devices,
                memdevs=vm.memory.memdevs,
            ),
            balloon=Balloon(**vars(vm.balloon)),
            guest_stats=Stats.from_stats(vm.guest_stats, now) if vm.guest_stats else None,
            guest_stats_problem=vm.guest_stats_error,
            event_counts=dict(vm.event_counts),
            last_event=vm.last_event,
            events_dropped=vm.events_dropped,
            host=vm.host.as_dict() if vm.host else None,
            estimate=EstimateOut(**vm.estimate.as_dict()) if vm.estimate else None,
            agent=AgentOut(**vars(vm.agent)) if vm.agent else None,
        )


class VMList(BaseModel):
    vms: list[VMSummary] = Field(description="by name")
    next_after: str | None = Field(
        default=None, description="pass as after for the next page; null at the end"
    )


class Event(BaseModel):
    id: int
    kind: str = Field(description="event (from QEMU), attach, detach, request or error")
    name: str
    data: dict[str, Any]
    qemu_time: float | None = Field(description="QEMU's timestamp of the event")
    recorded_at: float


class EventPage(BaseModel):
    vm: str
    events: list[Event] = Field(description="newest first")
    next_before_id: int | None = Field(
        description="pass as before_id for the next (older) page; null at the end"
    )


class BalloonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Strict: JSON true, 1.5 or "1" is not a size. QEMU's balloon target is an int64.
    target_bytes: StrictInt = Field(
        gt=0, le=2**63 - 1, description="memory the guest should have after the change"
    )
    force: StrictBool = Field(
        default=False,
        description="set a target below the guest's used memory plus the margin (or the "
        "configured minimum), which is refused otherwise",
    )


class BalloonAccepted(BaseModel):
    vm: str
    target_bytes: int
    actual_bytes: int | None = Field(description="the balloon's size when the request was sent")


class ReportedRangeOut(BaseModel):
    id: int = Field(description="the range's number: 1 for the first seen since attach")
    at: float = Field(description="end of the scan that first saw the block absent")
    block: str = Field(description="QEMU RAM block")
    offset: int = Field(description="bytes from the start of the RAM block")
    length: int
    order: int
    gpa: int | None = Field(description="guest-physical address, when the memory tree is known")
    discarded: int = Field(description="bytes of it the host still backed until then")


class RangePage(BaseModel):
    vm: str
    ranges: list[ReportedRangeOut] = Field(description="newest first")
    total: int = Field(description="ranges seen since reclaimd attached")
    problem: str | None
    next_before_id: int | None = Field(
        default=None, description="pass as before_id for the next (older) page; null at the end"
    )


class PressureOut(BaseModel):
    """Signs that the guest is short of memory, between its last two stats updates."""

    signals: list[
        Literal["oom_kills", "alloc_stalls", "swap_in", "major_faults", "available_below_margin"]
    ] = Field(description="the signals shown; empty: no pressure")
    swap_in_bytes_per_second: float | None
    major_faults_per_second: float | None
    major_fault_baseline: float | None = Field(description="the rate without pressure")
    alloc_stalls: int | None = Field(description="in the window; null: the guest sends none")
    oom_kills: int | None = Field(description="in the window; null: the guest sends none")
    available_bytes: int | None
    margin_bytes: int


class AdviceOut(BaseModel):
    """The balloon advice of one VM: what it should have, and what the host would get back."""

    vm: str
    at: float | None
    target_bytes: int | None = Field(
        description="recommended balloon target (the guest's usable memory); null: no advice"
    )
    expected_gain_bytes: int = Field(
        description="host memory the target returns: stranded and cache only, never memory "
        "free page reporting returned or will return"
    )
    current_bytes: int | None = Field(description="the balloon's actual now")
    floor_bytes: int | None = Field(description="used memory plus margin, or the minimum")
    action: Literal["inflate", "deflate", "hold", "none"]
    reasons: list[str]
    pressure: PressureOut | None
    reclaim: bool = Field(
        description="false: the VM is opted out (config, or its libvirt metadata) and the "
        "reclaim controller leaves it alone; the advice is given all the same"
    )
    minimum_bytes: int | None = Field(
        description="the VM's own minimum balloon target; null: the daemon's balloon_min_bytes"
    )
    options_source: Literal["config", "libvirt metadata"] | None = Field(
        description="where the VM's reclaim and minimum were set; null: nowhere (defaults)"
    )
