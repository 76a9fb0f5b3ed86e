"""Request dependencies: the daemon behind the app, the VM of the path, the bearer token for VM
changes, and a request body read only once those have passed."""

from __future__ import annotations

import email.message
import hmac
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from api.problems import readable
from daemon.fleet import VMState
from daemon.service import Reclaimd

_bearer = HTTPBearer(auto_error=False)
BEARER_SCHEME = _bearer.scheme_name  # its name in the OpenAPI document
Body = TypeVar("Body", bound=BaseModel)


def get_daemon(request: Request) -> Reclaimd:
    daemon: Reclaimd = request.app.state.daemon
    return daemon


DaemonDep = Annotated[Reclaimd, Depends(get_daemon)]


def shown(name: str) -> str:
    """A name from the request, quoted and bounded, for messages."""
    return repr(readable(name, 80))


def get_vm(name: str, daemon: DaemonDep) -> VMState:
    vm = daemon.fleet.get(name)
    if vm is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no VM named {shown(name)}")
    return vm


VMDep = Annotated[VMState, Depends(get_vm)]


def require_token(
    daemon: DaemonDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Refuse unless a token is configured and the request carries it (constant-time compare)."""
    token = daemon.settings.token
    if token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "changes to VMs are disabled: configure a token (RECLAIMD_TOKEN) to enable them",
        )
    offered = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(offered.encode(), token.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return "token"


TokenDep = Annotated[str, Depends(require_token)]


async def json_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body as ``model``. Routes call it after their checks of credentials
    and of the VM, so nothing is read for a request that fails those; the body is capped by
    ``api.limits`` (413). Raises RequestValidationError (422)."""
    content_type = email.message.Message()
    content_type["content-type"] = request.headers.get("content-type", "")
    subtype = content_type.get_content_subtype()
    if content_type.get_content_maintype() != "application" or not (
        subtype == "json" or subtype.endswith("+json")
    ):
        raise RequestValidationError(
            [{"loc": ("body",), "msg": "expected a JSON body (application/json)", "type": "json"}]
        )
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**e, "loc": ("body", *e.get("loc", ()))} for e in errors]
        ) from None
