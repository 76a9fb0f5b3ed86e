"""HTTP faults against ``reclaimd serve`` as a real process, with fake QMP VMs attached:

- 1,100 idle connections held open (and a few sending their request a byte at a time) at an
  open files limit of 1024, soft and hard, so the daemon cannot raise it: /metrics and REST
  still answer, a VM that restarts reconnects, and the log stays small;
- 300 MiB request bodies, with and without the token, with and without a Content-Length: 401
  or 413, and the daemon's peak memory does not grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.reclaimd_proc import TOKEN, ReclaimdProcess
from tests.qmp.fake_qmp import FakeQMPServer

IDLE_CONNECTIONS = 1100
SLOW_CONNECTIONS = 5
FILES_LIMIT = 1024
READ_TIMEOUT = 2.0
FLOOD_SECONDS = 8.0
# A request under the flood must be answered within this; without the bounds it is never
# answered (the process has no descriptor left to accept it).
ANSWER_WITHIN = 5.0
MiB = 1 << 20


@pytest.fixture
def enough_files() -> Iterator[None]:
    """This process holds the 1,100 client ends: raise its own soft limit for them."""
    need = IDLE_CONNECTIONS + 400
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.fail(f"the test needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.asynccontextmanager
async def reclaimd(
    workdir: Path, vms: list[FakeQMPServer], env: dict[str, str], prefix: list[str]
) -> AsyncIterator[ReclaimdProcess]:
    args = [arg for vm in vms for arg in ("--vm", f"{vm.path.stem}={vm.address}")]
    # Started from a thread: its wait for /healthz must not stop the fake VMs in this loop.
    process = await asyncio.to_thread(ReclaimdProcess, workdir, args, env, prefix)
    try:
        yield process
    finally:
        await asyncio.to_thread(process.stop)


async def vms_up(client: httpx.AsyncClient, names: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            vms = {vm["name"]: vm for vm in (await client.get("/api/v1/vms")).json()["vms"]}
            if names <= {name for name, vm in vms.items() if vm["up"]}:
                return vms
        if time.monotonic() > deadline:
            raise AssertionError(f"VMs {names} not up within {timeout} s")
        await asyncio.sleep(0.2)


def status_of(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit in /proc/{pid}/limits")


class Flood:
    """Holds ``count`` idle connections to ``port``, opening a new one whenever the server closes
    one, until stopped."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.opened = 0
        self.closed_by_server = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._hold()) for _ in range(self.count)]

    async def _hold(self) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.opened += 1
            try:
                stop = asyncio.create_task(self._stop.wait())
                read = asyncio.create_task(reader.read(1))
                await asyncio.wait({stop, read}, return_when=asyncio.FIRST_COMPLETED)
                if read.done():
                    self.closed_by_server += 1
                stop.cancel()
                read.cancel()
            finally:
                writer.close()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def slow_request(port: int) -> float | None:
    """Send a request head a byte every 0.1 s; the seconds until the server closed the
    connection, or None if it never did before the head was sent (about 40 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    head = b"GET /api/v1/vms HTTP/1.1\r\nHost: reclaimd\r\nX-Padding: " + b"p" * 350 + b"\r\n\r\n"
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    return time.monotonic() - started
        return None
    except ConnectionError:
        return time.monotonic() - started
    finally:
        writer.close()


async def timed_get(client: httpx.AsyncClient, path: str) -> float:
    started = time.monotonic()
    reply = await client.get(path)
    elapsed = time.monotonic() - started
    assert reply.status_code == 200, (path, reply.status_code, reply.text[:200])
    return elapsed


async def test_idle_and_slow_connections_beyond_the_files_limit(
    tmp_path: Path, fake_qmp: Callable[..., Any], enough_files: None
) -> None:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.fail("prlimit not found: install util-linux")
    vm1, vm2 = await fake_qmp("vm1"), await fake_qmp("vm2")
    env = {"RECLAIMD_HTTP_READ_TIMEOUT": str(READ_TIMEOUT)}
    limit = [prlimit, f"--nofile={FILES_LIMIT}:{FILES_LIMIT}", "--"]
    async with reclaimd(tmp_path, [vm1, vm2], env, limit) as daemon:
        pid = daemon.process.pid
        assert open_files_limits(pid) == (FILES_LIMIT, FILES_LIMIT)
        # A new connection per request: each must get through the accept queue.
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=daemon.url, limits=fresh, timeout=ANSWER_WITHIN
        ) as client:
            before = await vms_up(client, {"vm1", "vm2"})
            log_before = daemon.log.stat().st_size

            flood = Flood(daemon.port, IDLE_CONNECTIONS)
            flood.start()
            slow = [asyncio.create_task(slow_request(daemon.port)) for _ in range(SLOW_CONNECTIONS)]
            await asyncio.sleep(1.0)  # let the flood fill the server

            latencies: list[float] = []
            most_fds = 0
            restarted = False
            started = time.monotonic()
            while time.monotonic() - started < FLOOD_SECONDS:
                latencies.append(await timed_get(client, "/metrics"))
                latencies.append(await timed_get(client, "/api/v1/vms"))
                most_fds = max(most_fds, len(os.listdir(f"/proc/{pid}/fd")))
                if not restarted and time.monotonic() - started > 1:
                    # vm1's QEMU restarts: reclaimd must open a new socket to it, under the flood.
                    connections = vm1.connections
                    await vm1.stop()
                    await vm1.start()
                    restarted = True
                await asyncio.sleep(0.2)
            vms = await vms_up(client, {"vm1", "vm2"}, timeout=15)
            reconnects = (await client.get("/api/v1/vms/vm1")).json()["reconnects"]
            metrics = (await client.get("/metrics")).text
            await flood.stop()
            slow_closed = await asyncio.gather(*slow)

    log = daemon.log.read_text(errors="replace")[log_before:]
    print(
        f"\n{flood.opened} connections opened by the flood, {flood.closed_by_server} closed by "
        f"reclaimd; {len(latencies)} requests, median {statistics.median(latencies) * 1000:.0f} "
        f"ms, max {max(latencies) * 1000:.0f} ms; at most {most_fds} descriptors open; slow "
        f"requests closed after {slow_closed} s; {len(log)} bytes of log"
    )
    assert flood.opened >= IDLE_CONNECTIONS
    shed = [line for line in metrics.splitlines() if "reclaimd_http_connections_closed" in line]
    assert any('reason="limit"' in line and not line.endswith(" 0.0") for line in shed), shed
    # vm1 came back over a new connection, under the flood; vm2 never went.
    assert vm1.connections > connections and reconnects >= 1
    assert before["vm2"]["up"] and vms["vm1"]["up"] and vms["vm2"]["up"]
    assert all(t is not None and t < READ_TIMEOUT + 1.5 for t in slow_closed), slow_closed
    assert "Too many open files" not in log, log[-3000:]
    assert "out of system resource" not in log, log[-3000:]
    assert len(log) < 16 * 1024, log[-3000:]


def post_huge(port: int, headers: list[str], size: int, chunked: bool) -> bytes:
    """POST ``size`` bytes to the balloon route as fast as the server takes them; what the
    server answered before it closed the connection. Blocking (run it in a thread): a plain
    socket returns the answer the server sent even after the send failed."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = "\r\n".join(
        ["POST /api/v1/vms/vm1/balloon HTTP/1.1", "Host: reclaimd", framing, *headers, "", ""]
    )
    chunk = b"[" * MiB
    if chunked:
        chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(head.encode())
            while sent < size:
                sock.sendall(chunk)
                sent += MiB
        answer = b""
        with contextlib.suppress(ConnectionError):
            while data := sock.recv(65536):
                answer += data
    assert sent < size, "the server read the whole body"
    return answer


async def test_huge_bodies_are_refused_before_they_are_read(
    tmp_path: Path, fake_qmp: Callable[..., Any]
) -> None:
    vm1 = await fake_qmp("vm1")
    async with reclaimd(tmp_path, [vm1], {}, []) as daemon:
        pid = daemon.process.pid
        async with httpx.AsyncClient(base_url=daemon.url) as client:
            await vms_up(client, {"vm1"})
            peak_before = status_of(pid, "VmHWM")
            json = ["Content-Type: application/json"]
            auth = [*json, f"Authorization: Bearer {TOKEN}"]
            size = 300 * MiB
            cases = {
                "no token, length": (json, False),
                "no token, chunked": (json, True),
                "token, length": (auth, False),
                "token, chunked": (auth, True),
            }
            answers = {
                case: await asyncio.to_thread(post_huge, daemon.port, headers, size, chunked)
                for case, (headers, chunked) in cases.items()
            }
            peak_after = status_of(pid, "VmHWM")
            # The limit leaves requests of ordinary size alone.
            ok = await client.post(
                "/api/v1/vms/vm1/balloon",
                json={"target_bytes": 256 * MiB},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
    status = {case: answer.split(b"\r\n", 1)[0].decode() for case, answer in answers.items()}
    print(f"\npeak RSS {peak_before / MiB:.0f} -> {peak_after / MiB:.0f} MiB; {status}")
    assert status == {
        "no token, length": "HTTP/1.1 413 Request Entity Too Large",
        "no token, chunked": "HTTP/1.1 401 Unauthorized",
        "token, length": "HTTP/1.1 413 Request Entity Too Large",
        "token, chunked": "HTTP/1.1 413 Request Entity Too Large",
    }
    assert all(b"application/problem+json" in answer for answer in answers.values())
    assert peak_after - peak_before < 16 * MiB
    assert ok.status_code == 202, ok.text
