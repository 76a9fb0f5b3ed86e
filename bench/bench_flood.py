"""REST latency for the other VMs while one VM floods reclaimd with events.

``--quiet`` simulated guests (``python -m daemon.simguest fleet``) and one flooding peer (the
test suite's fake QMP server, in a child process of this script, told to send ``--rate`` events a
second: a hostile guest's monitor, since QEMU itself limits BALLOON_CHANGE to one a second), all
attached to ``reclaimd serve`` in connect mode. A client times REST requests about the quiet VMs
and ``/metrics`` for ``--duration`` seconds with the flood off, then on. Recorded: latency per
request (p50, p99, max), what the flood VM sent, what reclaimd counted, dropped and journalled,
and the daemon's CPU.

Usage: python bench/bench_flood.py [--quiet 10] [--rate 5000] [--duration 30] [--baseline REV]
Results go to bench/RESULTS-flood.md (``--results``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_fleet import before_after, cpu_seconds, daemon_process, free_port, pct, write_results

from daemon.journal import Journal
from daemon.simguest.launcher import FleetProcess

RESULTS = Path(__file__).with_name("RESULTS-flood.md")
ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
REQUESTS = {
    "GET /api/v1/vms": "/api/v1/vms",
    "GET /api/v1/vms/{quiet}": "/api/v1/vms/sim000",
    "GET /api/v1/vms/{quiet}/events": "/api/v1/vms/sim000/events?limit=100",
    "GET /metrics": "/metrics",
}


# ------------------------------------------------------------------ the flooding peer (a child)


def peer(socket: Path, rate: int) -> int:
    """Serve QMP on ``socket``; flood between SIGUSR1 and SIGUSR2; print the count on SIGTERM."""
    sys.path.insert(0, str(ROOT))
    from daemon.model.constants import PAGE_SIZE
    from tests.qmp.fake_qmp import FakeQMPServer, FakeVM, encode, event

    async def serve() -> int:
        server = await FakeQMPServer(socket, FakeVM(name="flood")).start()
        flooding, stopping = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, flooding.set)
        loop.add_signal_handler(signal.SIGUSR2, flooding.clear)
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        print("ready", flush=True)
        sent, tick = 0, 0.01
        per_tick = max(1, int(rate * tick))
        # Encoded once: the peer's own CPU is not what is measured, and the machine is small.
        chunks = [
            b"".join(
                encode(event("BALLOON_CHANGE", {"actual": (c * per_tick + i) * PAGE_SIZE})).encode()
                + b"\r\n"
                for i in range(per_tick)
            )
            for c in range(20)
        ]
        next_at = loop.time()
        while not stopping.is_set():
            if not flooding.is_set():
                await asyncio.sleep(0.05)
                next_at = loop.time()
                continue
            for writer in list(server._writers):
                writer.write(chunks[(sent // per_tick) % len(chunks)])
                sent += per_tick
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await server.stop()
        print(f"sent {sent}", flush=True)
        return 0

    return asyncio.run(serve())


# ------------------------------------------------------------------ the benchmark


@dataclass
class Phase:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    cpu: float = 0.0  # fraction of one core


@dataclass
class FloodResult:
    label: str
    phases: dict[str, Phase] = field(default_factory=dict)
    sent: int = 0
    counted: int = 0
    dropped: int | None = None
    journalled: int = 0


def measure(client: httpx.Client, pid: int, seconds: float) -> Phase:
    phase = Phase({name: [] for name in REQUESTS})
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - t0 < seconds:
        round_started = time.monotonic()
        for name, path in REQUESTS.items():
            started = time.perf_counter()
            client.get(path).raise_for_status()
            phase.latencies[name].append(time.perf_counter() - started)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - round_started)))
    phase.cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    return phase


def run(args: argparse.Namespace, workdir: Path, label: str, tree: Path | None) -> FloodResult:
    result = FloodResult(label)
    fleet_dir = workdir / "fleet"
    fleet_dir.mkdir()
    flood_socket = workdir / "flood.qmp"
    # As in bench_fleet: the guests step once a second and only use CPU nothing else wants.
    fleet = FleetProcess.start(
        count=args.quiet,
        directory=fleet_dir,
        ram_bytes=32 * MiB,
        log=workdir / "fleet.log",
        tick=1.0,
        sched_idle=True,
    )
    flood = subprocess.Popen(
        [sys.executable, __file__, "peer", "--socket", str(flood_socket), "--rate", str(args.rate)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert flood.stdout is not None
    assert flood.stdout.readline().strip() == "ready"
    vms = {s.stem: s for s in fleet.sockets} | {"flood": flood_socket}
    config = workdir / "reclaimd.toml"
    config.write_text(
        "".join(f'[[vm]]\nname = "{n}"\naddress = "unix:{p}"\n' for n, p in vms.items())
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECLAIMD_")}
    journal = workdir / "journal.sqlite3"
    env.update(RECLAIMD_JOURNAL=str(journal), RECLAIMD_POLL_INTERVAL="2")
    with open(workdir / "reclaimd.log", "wb") as log:
        daemon = subprocess.Popen(
            daemon_process(
                ["serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"], env, tree
            ),
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/healthz").json()["vms_up"] == len(vms):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("not every VM came up")
            time.sleep(0.5)
        time.sleep(args.warmup)
        before = sum(client.get("/api/v1/vms/flood").json()["event_counts"].values())
        result.phases["no flood"] = measure(client, daemon.pid, args.duration)
        flood.send_signal(signal.SIGUSR1)
        result.phases[f"{args.rate} events/s from one VM"] = measure(
            client, daemon.pid, args.duration
        )
        flood.send_signal(signal.SIGUSR2)
        time.sleep(5)  # what is in flight arrives
        detail: dict[str, Any] = client.get("/api/v1/vms/flood").json()
        result.counted = sum(detail["event_counts"].values()) - before
        result.dropped = detail.get("events_dropped")
    finally:
        client.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        flood.send_signal(signal.SIGTERM)
        out, _ = flood.communicate(timeout=30)
        result.sent = int(out.split()[-1])
        fleet.stop()
    with Journal(journal, max_events=10**9) as j:
        result.journalled = sum(
            1 for e in j.entries("flood", limit=10**7) if e.name == "BALLOON_CHANGE"
        )
    return result


def markdown(r: FloodResult) -> str:
    lines = [f"### {r.label}", "", "| ms | " + " | ".join(r.phases) + " |"]
    lines.append("|---|" + "---:|" * len(r.phases))
    for name in REQUESTS:
        cells = []
        for phase in r.phases.values():
            v = phase.latencies[name]
            cells.append(
                f"p50 {statistics.median(v) * 1e3:.1f}, p99 {pct(v, 0.99) * 1e3:.1f}, "
                f"max {max(v) * 1e3:.1f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| daemon CPU, % of a core | " + " | ".join(
        f"{p.cpu * 100:.0f}" for p in r.phases.values()) + " |")  # fmt: skip
    lines += [
        "",
        f"- flood VM: sent {r.sent} events; reclaimd counted {r.counted} and reported "
        f"{r.dropped} dropped; the journal holds {r.journalled} of them "
        "(the journal also holds the ones sent before the timed window, while attaching)",
    ]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        p = argparse.ArgumentParser()
        p.add_argument("peer")
        p.add_argument("--socket", type=Path, required=True)
        p.add_argument("--rate", type=int, required=True)
        a = p.parse_args()
        return peer(a.socket, a.rate)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", type=int, default=10)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--baseline", metavar="REV", help="also run git revision REV's daemon")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = before_after(
        args.baseline,
        "rd-flood-",
        lambda workdir, label, tree: run(args, workdir, label, tree),
        markdown,
    )
    section = (
        f"## {args.quiet} quiet VMs and one sending {args.rate} events/s, {args.duration:g} s "
        "per phase\n\n" + "\n\n".join(markdown(r) for r in results)
    )
    text = write_results(
        args.results, "REST latency during an event flood", "bench_flood.py", section
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
