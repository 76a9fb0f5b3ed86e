"""Run the API (and with it the daemon) under uvicorn, within bounds.

:func:`build_server` is the one place that says how uvicorn serves: the bounded connection
protocol (``api.connections``), request heads of at most :data:`MAX_REQUEST_HEAD_BYTES`, the
keep-alive and read timeouts, the listen backlog, TLS from the web config, and a repeat limit
on the HTTP path's log messages.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import resource
import socket
import ssl
import sys
from collections.abc import Callable

import uvicorn

from api.app import create_app
from api.connections import BoundedH11Protocol, ConnectionLimits
from api.fds import http_connection_limit, raise_soft_limit
from api.logthrottle import limit_repeats
from api.webconfig import WebConfig, load_web_config
from daemon.config import ConfigError, Settings
from daemon.instruments import HTTP_CONNECTION_LIMIT
from daemon.service import Reclaimd
from daemon.untrusted import one_line

log = logging.getLogger(__name__)

# h11 holds at most this much of a request head that has not ended, then answers 400 (a head
# that arrives complete in one read is parsed whole); reclaimd's requests need a few hundred
# bytes.
MAX_REQUEST_HEAD_BYTES = 8 * 1024
# Seconds an idle kept-alive connection stays open. Prometheus scrapes every 15 s or so and
# reconnects at no cost, so holding descriptors longer buys nothing.
KEEP_ALIVE_SECONDS = 5
# The event loop accepts up to this many connections at once (asyncio takes uvicorn's backlog
# for it) before their protocols run and close the excess: a small batch keeps that burst of
# descriptors small, far below what the HTTP share leaves spare.
ACCEPT_BATCH = 64
# Connections the kernel queues until reclaimd accepts them (capped by net.core.somaxconn):
# they cost the daemon no descriptor, and a long queue keeps a client's connection in line
# behind a flood instead of dropped (its SYN retried only after 1 s, 3 s, 7 s...).
LISTEN_QUEUE = 1024


def build_server(
    settings: Settings, daemon: Reclaimd | None = None, web: WebConfig | None = None
) -> uvicorn.Server:
    """The uvicorn server for ``settings``; ``web`` defaults to ``settings.web_config``'s file.
    Raises ConfigError when the web config cannot be used."""
    if web is None and settings.web_config is not None:
        web = load_web_config(settings.web_config)
    limits = ConnectionLimits(
        max_connections=http_connection_limit(settings.http_max_connections),
        read_timeout=settings.http_read_timeout,
    )
    HTTP_CONNECTION_LIMIT.set(limits.max_connections)
    tls = web.tls if web is not None else None
    config = uvicorn.Config(
        create_app(settings, daemon, web),
        host=settings.listen_host,
        port=settings.listen_port,
        http=BoundedH11Protocol.with_limits(limits),
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        backlog=ACCEPT_BATCH,
        log_level="info",
        log_config=None,  # uvicorn's lines go through the daemon's one handler and format
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        ssl_certfile=tls.cert_file if tls else None,
        ssl_keyfile=tls.key_file if tls else None,
        ssl_context_factory=_ssl_context(tls.context) if tls else None,
    )
    # uvicorn configures its loggers when the Config is made; the limit goes on after that.
    limit_repeats()
    return BoundedServer(config, defer_accept=math.ceil(settings.http_read_timeout), limits=limits)


class BoundedServer(uvicorn.Server):
    """uvicorn's server, with its listening sockets set up against connection floods."""

    def __init__(self, config: uvicorn.Config, defer_accept: int, limits: ConnectionLimits) -> None:
        super().__init__(config)
        self.defer_accept = defer_accept
        self.limits = limits

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", ()):
            for listener in server.sockets:
                tune_listener(listener.fileno(), self.defer_accept)
        log.info(
            "at most %d HTTP connections (open files limit %d)",
            self.limits.max_connections,
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        quiet_collector()


# Objects made per poll (stats, estimates, scans) live a poll or two, long enough to be
# promoted, so the collector's oldest generation keeps filling and a full collection walks
# every object: with 300 VMs that stopped the event loop for 150-190 ms a few times a minute
# (measured with a gc callback). Everything loaded at start-up is frozen out of those walks,
# and the young generation is collected less often, so fewer objects are promoted at all.
GC_THRESHOLDS = (20_000, 20, 20)


def quiet_collector() -> None:
    """Freeze what start-up made and space collections out (see :data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def tune_listener(fd: int, defer_accept: int) -> None:
    """Set the listening socket ``fd``'s queue to :data:`LISTEN_QUEUE` and defer accepting a
    connection until its first data arrives, for up to ``defer_accept`` seconds (Linux): a
    connection that sends nothing stays in the kernel for that long, costing no descriptor."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        if hasattr(socket, "TCP_DEFER_ACCEPT") and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
        # listen() again on a listening socket changes only the length of its queue.
        sock.listen(LISTEN_QUEUE)


def _ssl_context(
    make: Callable[[], ssl.SSLContext],
) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    # The web config's context (versions, client certificates) instead of uvicorn's default.
    return lambda _config, _default: make()


def bind_listener(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound (not yet listening); OSError when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
    # are TCP. With proto 0 each keep-alive response's second segment waited for the client's
    # delayed ACK: 40 ms per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class StartFailed(Exception):
    """The daemon could not start: ``Reclaimd.start`` raised ``__cause__`` (JournalError for the
    journal, OSError for the listen socket) and stopped what it had started."""


def run(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's two-phase shutdown; a second signal forces exit).

    The port is bound first: a port in use fails here, before the daemon attaches any VM (uvicorn
    binds only after its lifespan has run). Then the web config is read, then the daemon starts
    (its journal, its listen socket), and only then does uvicorn serve. A port in use or a bad
    web config is one line on stderr and exit 2, as the command's other start-up errors are;
    a daemon that cannot start raises StartFailed, for the command to say why."""
    raise_soft_limit()
    try:
        listener = bind_listener(settings.listen_host, settings.listen_port)
    except OSError as exc:
        return _refuse(f"cannot listen on {settings.listen}: {exc.strerror or exc}")
    with listener:
        daemon = Reclaimd(settings)
        try:
            server = build_server(settings, daemon)
        except ConfigError as exc:
            return _refuse(str(exc))
        # What uvicorn's Server.run does, around the daemon's start as well.
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(_start_and_serve(server, daemon, listener))
    return 0 if server.started else 1


def _refuse(message: str) -> int:
    # One line, whatever the message holds (a YAML parser's error spans several).
    print(f"reclaimd: {one_line(message, 1000)}", file=sys.stderr)
    return 2


async def _start_and_serve(
    server: uvicorn.Server, daemon: Reclaimd, listener: socket.socket
) -> None:
    """Start the daemon, then serve: the app's lifespan finds it started, and stops it at the
    end. Raises StartFailed."""
    # uvicorn's handlers from here: a signal during start-up stops the daemon once started.
    with server.capture_signals():
        try:
            await daemon.start()  # stops what it started when it fails
        except Exception as exc:
            raise StartFailed(str(exc)) from exc
        if server.should_exit:
            await daemon.stop()
            return
    await server.serve(sockets=[listener])
