"""Request dependencies: the daemon behind the app, and the bearer token for VM changes."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from daemon.fleet import VMState
from daemon.service import Reclaimd

_bearer = HTTPBearer(auto_error=False)


def get_daemon(request: Request) -> Reclaimd:
    daemon: Reclaimd = request.app.state.daemon
    return daemon


DaemonDep = Annotated[Reclaimd, Depends(get_daemon)]


def get_vm(name: str, daemon: DaemonDep) -> VMState:
    vm = daemon.fleet.get(name)
    if vm is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no VM named {name!r}")
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
