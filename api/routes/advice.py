"""``GET /api/v1/vms/{name}/advice``: the VM's balloon advice, with its reasons."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from api.deps import VMDep
from api.problems import problems
from api.schemas import AdviceOut, PressureOut

router = APIRouter(prefix="/api/v1/vms", tags=["advice"])
_RESPONSES = problems(404, 422)
_RESPONSES[404]["description"] = "no VM of that name"


@router.get(
    "/{name}/advice", operation_id="getAdvice", response_model=AdviceOut, responses=_RESPONSES
)
async def get_advice(vm: VMDep) -> AdviceOut:
    """The recommended balloon target and the memory it would return (always on; acting on
    it is the controller's, when configured)."""
    advice = vm.advice
    opts = vm.options
    options: dict[str, Any] = {
        "reclaim": opts.reclaim,
        "minimum_bytes": opts.minimum_bytes,
        "options_source": opts.source,
    }
    if advice is None:
        return AdviceOut(
            vm=vm.name,
            **options,
            at=None,
            target_bytes=None,
            expected_gain_bytes=0,
            current_bytes=vm.balloon.actual_bytes,
            floor_bytes=None,
            action="none",
            reasons=["no estimate yet"],
            pressure=None,
        )
    body = asdict(advice)
    body["pressure"] = PressureOut(**body["pressure"])
    return AdviceOut(vm=vm.name, **body, **options)
