"""The FastAPI application. Its lifespan runs the daemon, so one process serves everything.

Around the routes, outermost first: the body limit (``api.limits``: 413 before anything is
read), then, with users in the web config, read authentication (``api.readauth``: 401 before
any route runs). Every error is a problem details body (``api.problems``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from api import problems
from api.deps import BEARER_SCHEME
from api.limits import BodyLimit
from api.metrics import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, scrape
from api.readauth import ReadAuth, is_open
from api.routes import advice, balloon, health, host, status, vms
from api.schemas import BalloonRequest
from api.version import VERSION
from api.webconfig import WebConfig
from daemon.config import Settings
from daemon.service import Reclaimd

_METRICS_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition (0.0.4), or OpenMetrics 1.0 when the Accept "
        "header asks for it; gzip-encoded when Accept-Encoding allows",
        "content": {
            TEXT_CONTENT_TYPE: {"schema": {"type": "string"}},
            OPENMETRICS_CONTENT_TYPE: {"schema": {"type": "string"}},
        },
    }
}


def create_app(
    settings: Settings, daemon: Reclaimd | None = None, web: WebConfig | None = None
) -> FastAPI:
    """Build the app around ``daemon`` (a new one from ``settings`` by default); ``web`` is the
    loaded web config, whose users turn on read authentication."""
    daemon = daemon or Reclaimd(settings)
    users = web.users if web is not None else {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not daemon.started:
            await daemon.start()
        try:
            yield
        finally:
            await daemon.stop()

    app = FastAPI(
        title="reclaimd",
        version=VERSION,
        summary="Memory your QEMU/KVM guests use, what the host got back, and what it could",
        lifespan=lifespan,
    )
    app.state.daemon = daemon

    @app.get(
        "/metrics",
        operation_id="getMetrics",
        response_class=Response,
        responses=_METRICS_RESPONSE,
    )
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: VM data under ``qemu_``, the daemon's own under ``reclaimd_``,
        the process's under ``process_`` and ``python_``."""
        # Runs on the event loop: it only reads in-memory state (cost: bench/bench_scrape.py).
        reply = scrape(
            daemon.fleet,
            request.headers.get("accept", ""),
            request.headers.get("accept-encoding", ""),
        )
        headers = {"Vary": "Accept, Accept-Encoding"}
        if reply.gzipped:
            headers["Content-Encoding"] = "gzip"
        return Response(reply.body, media_type=reply.content_type, headers=headers)

    app.include_router(health.router)
    app.include_router(vms.router)
    app.include_router(balloon.router)
    app.include_router(advice.router)
    app.include_router(host.router)
    app.include_router(status.router)
    problems.install(app)
    # Middleware added last runs first: the body limit sees every request before anything else.
    if users:
        app.add_middleware(ReadAuth, users=users, token=settings.token)
    app.add_middleware(BodyLimit)

    schemes = {"basicAuth": {"type": "http", "scheme": "basic"}} if users else {}
    if users:
        schemes[BEARER_SCHEME] = {"type": "http", "scheme": "bearer"}
    problems.document(
        app,
        authenticated=lambda path: bool(users) and not is_open(path),
        schemes=schemes,
        models=(BalloonRequest,),
    )
    return app
