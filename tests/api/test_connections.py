"""Bounded HTTP connections on a real uvicorn server: the oldest idle connection is shed beyond
the limit, busy ones never are, and a request must arrive whole within the read timeout."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from api.server import bind_listener
from daemon.config import Settings
from daemon.instruments import REGISTRY
from daemon.service import Reclaimd
from tests.api.live import live_server
from tests.api.test_api import TOKEN, attach

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def closed_total(reason: str) -> float:
    value = REGISTRY.get_sample_value("reclaimd_http_connections_closed_total", {"reason": reason})
    return value or 0.0


def open_connections() -> float:
    return REGISTRY.get_sample_value("reclaimd_http_connections") or 0.0


async def connect(url: str, first: bytes = b"G") -> Conn:
    """A connection that has sent ``first`` of a request head (the kernel hands a connection
    that sent nothing to the server only after the deferred-accept time)."""
    host, port = url.removeprefix("http://").split(":")
    conn = await asyncio.open_connection(host, int(port))
    conn[1].write(first)
    await conn[1].drain()
    return conn


async def closed_by_server(conn: Conn, within: float) -> bool:
    """Whether the server closes ``conn`` within ``within`` seconds (EOF or reset)."""
    try:
        data = await asyncio.wait_for(conn[0].read(65536), within)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    while data:  # a response first (a request that completed), then the close
        try:
            data = await asyncio.wait_for(conn[0].read(65536), within)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return True


async def until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def small(settings: Settings) -> AsyncIterator[tuple[str, Reclaimd]]:
    """A server that keeps 4 connections and gives a request 1 s to arrive."""
    limited = settings.model_copy(
        update={"http_max_connections": 4, "http_read_timeout": 1.0, "token": SecretStr(TOKEN)}
    )
    daemon = Reclaimd(limited)
    await daemon.start()
    async with live_server(limited, daemon) as url:
        yield url, daemon
    await daemon.stop()


async def test_beyond_the_limit_the_oldest_idle_connection_is_closed(
    small: tuple[str, Reclaimd],
) -> None:
    url, _ = small
    shed_before = closed_total("limit")
    idle = [await connect(url) for _ in range(4)]
    await until(lambda: open_connections() == 4)
    async with httpx.AsyncClient(base_url=url) as client:
        reply = await client.get("/api/v1/vms")
        assert reply.status_code == 200
    assert await closed_by_server(idle[0], within=2), "the oldest idle connection stays open"
    for conn in idle[1:]:
        assert not await closed_by_server(conn, within=0.2), "a newer idle connection was closed"
    assert closed_total("limit") == shed_before + 1
    for _, writer in idle:
        writer.close()


async def test_a_connection_busy_with_a_request_is_never_shed(
    small: tuple[str, Reclaimd], fake_qmp: object
) -> None:
    url, daemon = small
    await attach(daemon, await fake_qmp())  # type: ignore[operator]
    body = b'{"target_bytes": 268435456}'
    busy = await connect(
        url,
        b"POST /api/v1/vms/vm1/balloon HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5],
    )
    await asyncio.sleep(0.1)
    idle = [await connect(url) for _ in range(4)]  # beyond the limit from the fourth on
    assert await closed_by_server(idle[0], within=2), "the oldest idle one should go"
    busy[1].write(body[5:])
    await busy[1].drain()
    head = await asyncio.wait_for(busy[0].readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 202"), head
    for _, writer in [busy, *idle]:
        writer.close()


async def test_a_request_must_arrive_whole_within_the_read_timeout(
    small: tuple[str, Reclaimd],
) -> None:
    url, _ = small
    timeouts_before = closed_total("read_timeout")
    started = time.monotonic()
    trickle = await connect(url)

    async def one_byte_at_a_time() -> None:
        for byte in b"ET /api/v1/vms HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"x" * 1000:
            trickle[1].write(bytes([byte]))
            try:
                await trickle[1].drain()
            except ConnectionError:
                return
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(one_byte_at_a_time())
    assert await closed_by_server(trickle, within=3), "a request trickling in is never cut"
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3, elapsed
    sender.cancel()
    assert closed_total("read_timeout") == timeouts_before + 1
    # A client that sends its request at once is served as before.
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/healthz")).status_code == 200
    trickle[1].close()


async def test_a_connection_that_sends_nothing_is_closed(small: tuple[str, Reclaimd]) -> None:
    url, _ = small
    timeouts_before = closed_total("read_timeout")
    silent = await connect(url, first=b"")
    # The kernel holds it for the deferred-accept time (1 s here, rounded up to its SYN-ACK
    # retransmission at 1 s or 3 s), then the read timeout (1 s) runs.
    assert await closed_by_server(silent, within=6), "a connection that sends nothing stays"
    assert closed_total("read_timeout") == timeouts_before + 1
    silent[1].close()


async def test_no_more_than_8_kib_of_an_unfinished_request_head_is_held(
    small: tuple[str, Reclaimd],
) -> None:
    # h11 bounds what it buffers of an incomplete head: a head that has not ended within 8 KiB
    # is refused at once (a complete head read in one go is parsed whole).
    url, _ = small
    conn = await connect(url, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Padding: " + b"p" * 9000)
    answer = await asyncio.wait_for(conn[0].read(65536), 2)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    conn[1].close()


async def test_connections_of_the_serve_listener_send_without_nagle() -> None:
    """``reclaimd serve`` binds its own listener; asyncio turns Nagle off only on sockets that
    say they are TCP. With Nagle on, every keep-alive response waited for a delayed ACK."""
    listener = bind_listener("127.0.0.1", 0)
    listener.listen()
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda _r, w: accepted.set_result(w), sock=listener)
    try:
        _, client = await asyncio.open_connection(*listener.getsockname())
        served = await asyncio.wait_for(accepted, 5)
        sock = served.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        client.close()
        served.close()
    finally:
        server.close()
        await server.wait_closed()
