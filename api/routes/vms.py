"""``/api/v1/vms``: the fleet, one VM, and its journal of events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import DaemonDep, VMDep
from api.problems import problems
from api.schemas import Event, EventPage, VMDetail, VMList, VMSummary

router = APIRouter(prefix="/api/v1/vms", tags=["vms"])
# Journal ids are SQLite integers: signed 64-bit. A cursor beyond is refused (422), not passed on.
MAX_EVENT_ID = 2**63 - 1
NOT_FOUND = problems(404)
NOT_FOUND[404]["description"] = "no VM of that name"


@router.get("", operation_id="listVMs", response_model=VMList, responses=problems(422))
async def list_vms(
    daemon: DaemonDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    after: Annotated[
        str | None, Query(max_length=1024, description="paging cursor: VMs named after it")
    ] = None,
) -> VMList:
    """The fleet by name; paged by ``after`` (the last name of a page) and ``next_after``."""
    vms = [vm for vm in daemon.fleet if after is None or vm.name > after]
    page = vms[:limit]
    return VMList(
        vms=[VMSummary.from_state(vm) for vm in page],
        next_after=page[-1].name if len(vms) > len(page) else None,
    )


@router.get(
    "/{name}",
    operation_id="getVM",
    response_model=VMDetail,
    responses={**NOT_FOUND, **problems(422)},
)
async def get_vm(vm: VMDep) -> VMDetail:
    return VMDetail.from_state(vm)


@router.get(
    "/{name}/events",
    operation_id="listVMEvents",
    response_model=EventPage,
    responses={**NOT_FOUND, **problems(422)},
)
async def list_events(
    vm: VMDep,
    daemon: DaemonDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    since: Annotated[
        float | None,
        Query(ge=0, allow_inf_nan=False, description="only entries recorded at/after"),
    ] = None,
    before_id: Annotated[
        int | None, Query(ge=1, le=MAX_EVENT_ID, description="paging cursor")
    ] = None,
) -> EventPage:
    entries = await daemon.events(vm.name, since=since, before_id=before_id, limit=limit + 1)
    more = len(entries) > limit
    entries = entries[:limit]
    return EventPage(
        vm=vm.name,
        events=[
            Event(
                id=e.id,
                kind=e.kind,
                name=e.name,
                data=dict(e.data),
                qemu_time=e.qemu_time,
                recorded_at=e.recorded_at,
            )
            for e in entries
        ],
        next_before_id=entries[-1].id if more and entries else None,
    )
