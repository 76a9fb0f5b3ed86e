"""``/api/v1/vms/{name}/reported-ranges`` and ``/estimate``: what the host got back, and could."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import VMDep
from api.problems import problems
from api.routes.vms import MAX_EVENT_ID
from api.schemas import EstimateOut, EstimatePage, RangePage, ReportedRangeOut, WhatIfOut
from daemon.model import MAX_PAGE_ORDER

router = APIRouter(prefix="/api/v1/vms", tags=["host"])


@router.get(
    "/{name}/reported-ranges",
    operation_id="listReportedRanges",
    response_model=RangePage,
    responses=problems(404, 422),
)
async def reported_ranges(
    vm: VMDep,
    since: Annotated[
        float | None, Query(ge=0, allow_inf_nan=False, description="only ranges seen after")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    before_id: Annotated[
        int | None, Query(ge=1, le=MAX_EVENT_ID, description="paging cursor")
    ] = None,
) -> RangePage:
    """Blocks that free page reporting returned to the host, newest first; paged as events
    are (``before_id``, ``next_before_id``)."""
    history = vm.ranges
    if history is None or vm.host is None or vm.host.ledger is None:
        problem = (vm.host and vm.host.problem_detail) or "no host scan yet"
        return RangePage(vm=vm.name, ranges=[], total=0, problem=problem)
    kept = [
        (n, r)
        for n, r in history.numbered()
        if (since is None or r.at > since) and (before_id is None or n < before_id)
    ]
    page = kept[-limit:]
    return RangePage(
        vm=vm.name,
        ranges=[ReportedRangeOut(id=n, **vars(r)) for n, r in reversed(page)],
        total=history.total,
        problem=None,
        next_before_id=page[0][0] if len(kept) > len(page) else None,
    )


@router.get(
    "/{name}/estimate",
    operation_id="getEstimate",
    response_model=EstimatePage,
    responses=problems(404, 422),
)
async def get_estimate(
    vm: VMDep,
    order: Annotated[
        int | None,
        Query(ge=0, le=MAX_PAGE_ORDER, description="what-if: another page_reporting_order"),
    ] = None,
) -> EstimatePage:
    """The reclaim estimate, component by component, with sources, input times, the free split
    by order and what reporting at every order would return."""
    if vm.estimate is None:
        return EstimatePage(vm=vm.name, estimate=None, problem="no estimate yet")
    what_if = None
    if order is not None:
        what_if = WhatIfOut(**asdict(vm.estimate.what_if(order)))
    return EstimatePage(
        vm=vm.name,
        estimate=EstimateOut(**vm.estimate.as_dict()),
        problem=None,
        what_if=what_if,
    )
