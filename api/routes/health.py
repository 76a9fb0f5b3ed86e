"""``GET /healthz``: liveness for the compose healthcheck and for probes."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import DaemonDep
from api.schemas import Health
from api.version import VERSION

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="getHealth", response_model=Health)
async def healthz(daemon: DaemonDep) -> Health:
    vms = list(daemon.fleet)
    return Health(
        status="ok" if daemon.started else "starting",
        version=VERSION,
        vms=len(vms),
        vms_up=sum(vm.up for vm in vms),
    )
