"""``POST /api/v1/vms/{name}/balloon``: the one call that changes a VM. Token required."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from api.deps import DaemonDep, TokenDep, VMDep
from api.schemas import BalloonAccepted, BalloonRequest, Problem
from daemon.service import UnknownVM, VMUnavailable

router = APIRouter(prefix="/api/v1/vms", tags=["balloon"])


@router.post(
    "/{name}/balloon",
    response_model=BalloonAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        401: {"model": Problem},
        403: {"model": Problem},
        404: {"model": Problem},
        409: {"model": Problem, "description": "the VM cannot take the request now"},
        422: {"model": Problem},
    },
)
async def set_balloon(
    body: BalloonRequest, vm: VMDep, daemon: DaemonDep, who: TokenDep
) -> BalloonAccepted:
    """Set the balloon target: the guest converges to ``target_bytes`` of usable memory."""
    ram = vm.memory.ram_bytes
    if ram is not None and body.target_bytes > ram:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"target_bytes {body.target_bytes} exceeds the VM's RAM ({ram} bytes)",
        )
    try:
        await daemon.set_balloon(vm.name, body.target_bytes, requester=who)
    except UnknownVM:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no VM named {vm.name!r}") from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
    except VMUnavailable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return BalloonAccepted(
        vm=vm.name, target_bytes=body.target_bytes, actual_bytes=vm.balloon.actual_bytes
    )
