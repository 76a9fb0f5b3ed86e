"""The API served for real: uvicorn as ``reclaimd serve`` runs it (``api.server.build_server``),
on a free port of 127.0.0.1, in the test's event loop, so fake QMP VMs in the same loop can be
attached to its daemon."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from api.server import build_server
from api.webconfig import WebConfig
from daemon.config import Settings
from daemon.service import Reclaimd
from tests.e2e.reclaimd_proc import free_port


@contextlib.asynccontextmanager
async def live_server(
    settings: Settings, daemon: Reclaimd | None = None, web: WebConfig | None = None
) -> AsyncIterator[str]:
    """Serve until the block ends; yields the base URL (https when ``web`` has TLS)."""
    port = free_port()
    settings = settings.model_copy(update={"listen": f"127.0.0.1:{port}"})
    server = build_server(settings, daemon, web)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.02)
        if not server.started:
            raise AssertionError(
                f"uvicorn did not start: {task.exception() if task.done() else ''}"
            )
        scheme = "https" if web is not None and web.tls is not None else "http"
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
