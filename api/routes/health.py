"""``GET /healthz`` (liveness) and ``GET /readyz`` (readiness), for compose and Kubernetes probes.

Live: the process answers. Ready: the configuration is loaded, the daemon has started every
VM source, and each VM known then has had its first attach attempt (attached, or failed with a
cause): before that, an empty or all-down fleet would be a lie to whoever reads it. Readiness
latches: a VM that later disconnects or appears does not make the daemon unready again (that is
``qemu_vm_up``'s and the VM's own state's to tell).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status

from api.deps import DaemonDep
from api.problems import problems
from api.schemas import Health, Readiness
from api.version import VERSION
from daemon.fleet import SessionState, VMState

router = APIRouter(tags=["health"])
# States a session passes through before its first attempt has an outcome.
_FIRST_ATTEMPT = frozenset({SessionState.IDLE, SessionState.CONNECTING, SessionState.ATTACHING})
_NOT_READY = problems(503)
_NOT_READY[503]["description"] = "starting: not every VM has had its first attach attempt"


@router.get("/healthz", operation_id="getHealth", response_model=Health)
async def healthz(daemon: DaemonDep) -> Health:
    vms = list(daemon.fleet)
    return Health(
        status="ok" if daemon.started else "starting",
        version=VERSION,
        vms=len(vms),
        vms_up=sum(vm.up for vm in vms),
    )


@router.get("/readyz", operation_id="getReadiness", response_model=Readiness, responses=_NOT_READY)
async def readyz(daemon: DaemonDep, request: Request) -> Readiness:
    vms = list(daemon.fleet)
    if not getattr(request.app.state, "ready", False):
        if not daemon.started:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the daemon is starting")
        waiting = sorted(vm.name for vm in vms if not attempted(vm))
        if waiting:
            shown = ", ".join(waiting[:10]) + (", ..." if len(waiting) > 10 else "")
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"waiting for the first attach attempt of {len(waiting)} VMs: {shown}",
            )
        request.app.state.ready = True
    return Readiness(status="ready", vms=len(vms), vms_up=sum(vm.up for vm in vms))


def attempted(vm: VMState) -> bool:
    """Whether the VM's first attach attempt has an outcome: attached once, or failed."""
    return vm.attached_at is not None or vm.session_state not in _FIRST_ATTEMPT
