"""The status page: ``/`` (the fleet), ``/vm/{name}`` (one VM) and their script and style.

Not in the OpenAPI document: they are for people, and the REST API they read is documented.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import HTMLResponse

from api.deps import DaemonDep, VMDep
from api.statuspage import CSP, fleet_page, vm_page

router = APIRouter(include_in_schema=False)
_STATIC: Final = files("api") / "static"
_ASSETS: Final = {
    "status.js": ("text/javascript; charset=utf-8", (_STATIC / "status.js").read_bytes()),
    "status.css": ("text/css; charset=utf-8", (_STATIC / "status.css").read_bytes()),
}
_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@router.get("/", response_class=HTMLResponse)
async def fleet(daemon: DaemonDep) -> HTMLResponse:
    return HTMLResponse(fleet_page(list(daemon.fleet)), headers=_HEADERS)


@router.get("/vm/{name}", response_class=HTMLResponse)
async def vm(vm: VMDep) -> HTMLResponse:
    return HTMLResponse(vm_page(vm), headers=_HEADERS)


@router.get("/static/{asset}")
async def asset(asset: str) -> Response:
    if asset not in _ASSETS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file")
    media_type, body = _ASSETS[asset]
    return Response(body, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})
