"""How a monitor meets its client: the two socket chardev modes reclaimd attaches through.

- ``listen_unix``: ``-qmp unix:PATH,server=on,wait=off``. The socket file is replaced if it
  exists and removed on close, as QEMU does.
- ``connect_unix``: ``-chardev socket,path=PATH,reconnect=N -mon chardev=...,mode=control``.
  QEMU connects out, retries every N seconds while the peer is absent and reconnects N seconds
  after a hang-up, greeting each new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from daemon.simguest.monitor import Monitor


class UnixListener:
    """A listening QMP socket; ``close()`` stops it and removes the file."""

    def __init__(self, server: asyncio.Server, path: Path) -> None:
        self._server = server
        self.path = path

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        await self._server.wait_closed()


async def listen_unix(monitor: Monitor, path: Path) -> UnixListener:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(monitor.serve, path=str(path))
    return UnixListener(server, path)


async def connect_unix(monitor: Monitor, path: Path, reconnect: float) -> None:
    """Run forever: connect to ``path``, serve the session, wait ``reconnect`` s, repeat.

    Cancel the task to stop. ``reconnect`` must be positive; QEMU without ``reconnect=``
    fails at start instead, which the caller does by connecting once itself.
    """
    if reconnect <= 0:
        raise ValueError("reconnect must be positive")
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError:
            await asyncio.sleep(reconnect)
            continue
        await monitor.serve(reader, writer)
        await asyncio.sleep(reconnect)
