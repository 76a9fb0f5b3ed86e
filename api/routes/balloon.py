"""``POST /api/v1/vms/{name}/balloon``: the one call that changes a VM. Token required."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError

from api.deps import DaemonDep, TokenDep, VMDep, json_body, shown
from api.problems import problems
from api.schemas import BalloonAccepted, BalloonRequest
from daemon.service import UnknownVM, VMUnavailable

router = APIRouter(prefix="/api/v1/vms", tags=["balloon"])

# The body is read by the route after the token and the VM are checked (api.deps.json_body), so
# FastAPI does not know it: it is declared here, its schema added to the document by api.app.
_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BalloonRequest"}}},
}
_RESPONSES = problems(401, 403, 404, 409, 422)
_RESPONSES[409]["description"] = "the VM cannot take the request now"


@router.post(
    "/{name}/balloon",
    operation_id="setBalloon",
    response_model=BalloonAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=_RESPONSES,
    openapi_extra={"requestBody": _BODY},
)
async def set_balloon(
    who: TokenDep, vm: VMDep, daemon: DaemonDep, request: Request
) -> BalloonAccepted:
    """Set the balloon target: the guest converges to ``target_bytes`` of usable memory."""
    body = await json_body(request, BalloonRequest)
    ram = vm.memory.ram_bytes
    if ram is not None and body.target_bytes > ram:
        raise invalid_target(f"{body.target_bytes} exceeds the VM's RAM ({ram} bytes)")
    try:
        await daemon.set_balloon(vm.name, body.target_bytes, requester=who, force=body.force)
    except UnknownVM:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no VM named {shown(vm.name)}") from None
    except ValueError as exc:
        raise invalid_target(str(exc)) from None
    except VMUnavailable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return BalloonAccepted(
        vm=vm.name, target_bytes=body.target_bytes, actual_bytes=vm.balloon.actual_bytes
    )


def invalid_target(reason: str) -> RequestValidationError:
    """A 422 for a target the VM cannot take, located at the body's ``target_bytes``."""
    issue = {"loc": ("body", "target_bytes"), "msg": reason, "type": "value_error"}
    return RequestValidationError([issue])
