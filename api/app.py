"""The FastAPI application. Its lifespan runs the daemon, so one process serves everything."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.metrics import exposition
from api.routes import balloon, health, host, vms
from api.version import VERSION
from daemon.config import Settings
from daemon.service import Reclaimd


def create_app(settings: Settings, daemon: Reclaimd | None = None) -> FastAPI:
    """Build the app around ``daemon`` (a new one from ``settings`` by default)."""
    daemon = daemon or Reclaimd(settings)

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

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # Runs on the event loop: it only reads in-memory state (cost: bench/bench_scrape.py).
        return Response(exposition(daemon.fleet), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"])
        return JSONResponse(
            status_code=422, content={"detail": f"{where}: {first['msg']}", "errors": errors}
        )

    app.include_router(health.router)
    app.include_router(vms.router)
    app.include_router(balloon.router)
    app.include_router(host.router)
    return app
