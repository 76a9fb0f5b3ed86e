"""Run the API (and with it the daemon) under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from api.app import create_app
from daemon.config import Settings

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's two-phase shutdown; a second signal forces exit)."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn exits the process itself on a bind failure; a failed startup lands here.
    return 0 if server.started else 1
