"""Restart-to-up under churn: QEMUs (or simulated guests) killed and restarted, over and over.

``--vms`` guests and ``reclaimd serve`` attached to each in connect mode (``[[vm]]`` in a
config file, the daemon's default backoff). Then ``--cycles`` restarts in all,
``--concurrency`` at a time: a worker picks a VM that is up, ends its guest (SIGTERM, after
which the guest says SHUTDOWN and exits, or SIGKILL, which leaves the socket file behind),
waits a random 0-0.5 s, starts a new guest on the same socket and waits until reclaimd has it
up again.

The guests (``--guests``): ``qemu``, real QEMU processes (TCG, stopped with ``-S`` so that
twenty of them leave the two cores to reclaimd: the monitor, the balloon device, SHUTDOWN on
SIGTERM and the socket left behind on SIGKILL are QEMU's own), or ``sim``, simulated guests (one
``python -m daemon.simguest run`` process each, which start in about a second).

Measured, per restart, from reclaimd's own journal (the attach entry with the new guest's pid):

- restart-to-up: from starting the new guest process to reclaimd's attach;
- ready-to-up: from the new guest's socket accepting connections to reclaimd's attach;

and: every SHUTDOWN a guest sent while attached is in the journal; the daemon's open
descriptors, threads and event-loop tasks (``reclaimd_asyncio_tasks``) before and after.

Usage: python bench/bench_churn.py [--guests qemu|sim] [--vms 20] [--cycles 300]
[--concurrency 4] [--baseline REV]
Results go to bench/RESULTS-churn.md (``--results``). ``--baseline REV`` runs the daemon of
git revision REV against the same schedule first (no task count: it has no such metric).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from bench_fleet import before_after, daemon_process, free_port, pct, terminate, write_results

from daemon.journal import Journal
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.launcher import GuestProcess

RESULTS = Path(__file__).with_name("RESULTS-churn.md")
MiB = 1 << 20


@dataclass
class Restart:
    vm: str
    how: str  # "term" or "kill"
    spawned_at: float  # wall clock, as the journal's
    ready_at: float
    pid: int
    up_at: float | None = None  # reclaimd's attach of the new guest, from its journal


@dataclass
class ChurnResult:
    label: str
    vms: int
    restarts: list[Restart] = field(default_factory=list)
    shutdowns_sent: dict[str, int] = field(default_factory=dict)
    shutdowns_recorded: dict[str, int] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)  # fds, threads, tasks
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Daemon:
    """``reclaimd serve`` with a config of static VMs; ``tree``: another revision's packages."""

    def __init__(self, workdir: Path, sockets: dict[str, Path], tree: Path | None) -> None:
        self.port = free_port()
        self.journal = workdir / "journal.sqlite3"
        config = workdir / "reclaimd.toml"
        config.write_text(
            "".join(f'[[vm]]\nname = "{n}"\naddress = "unix:{p}"\n' for n, p in sockets.items())
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECLAIMD_")}
        env.update(RECLAIMD_JOURNAL=str(self.journal), RECLAIMD_POLL_INTERVAL="2")
        self.log = open(workdir / f"reclaimd-{self.port}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            daemon_process(
                ["serve", "--config", str(config), "--listen", f"127.0.0.1:{self.port}"], env, tree
            ),
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30.0)
        self._lock = threading.Lock()

    def vm(self, name: str) -> dict[str, Any] | None:
        with contextlib.suppress(httpx.HTTPError), self._lock:
            reply = self.client.get(f"/api/v1/vms/{name}")
            if reply.status_code == 200:
                body: dict[str, Any] = reply.json()
                return body
        return None

    def wait_up(self, name: str, pid: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"reclaimd exited with {self.process.returncode}")
            vm = self.vm(name)
            if vm is not None and vm["up"] and vm["pid"] == pid:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{name} (pid {pid}) not up after {timeout:g} s")

    def resources(self) -> dict[str, float]:
        pid = self.process.pid
        out = {
            "open descriptors": float(len(os.listdir(f"/proc/{pid}/fd"))),
            "threads": float(len(os.listdir(f"/proc/{pid}/task"))),
        }
        with contextlib.suppress(httpx.HTTPError), self._lock:
            for line in self.client.get("/metrics").text.splitlines():
                if line.startswith("reclaimd_asyncio_tasks "):
                    out["event-loop tasks"] = float(line.split()[1])
        return out

    def stop(self) -> None:
        self.client.close()
        terminate(self.process)
        self.log.close()


class Guest(Protocol):
    @property
    def pid(self) -> int: ...

    def stop(self, timeout: float = ...) -> int: ...

    def kill(self) -> int: ...


class QemuGuest:
    """A real QEMU with its monitor on ``socket`` and a balloon, its vCPUs never started."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, name: str, sock: Path, log: Path, timeout: float = 30.0) -> QemuGuest:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise RuntimeError("no qemu-system-x86_64 (apt-get install qemu-system-x86)")
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [qemu, "-accel", "tcg", "-S", "-m", "64", "-nodefaults", "-display", "none",
                 "-name", name, "-qmp", f"unix:{sock},server=on,wait=off",
                 "-device", "virtio-balloon-pci"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:  # accepting: a connection to a socket file a killed QEMU left is refused
            if process.poll() is not None:
                raise RuntimeError(f"QEMU for {name} exited with {process.returncode}: see {log}")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(sock))
                    return cls(process)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"QEMU for {name} did not listen on {sock} in {timeout:g} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM: QEMU says SHUTDOWN (reason host-signal) to its monitor and exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        return self.process.wait()


def _start_guest(kind: str, name: str, sock: Path, log: Path) -> tuple[Guest, float, float]:
    spawned = time.time()
    guest: Guest
    if kind == "qemu":
        guest = QemuGuest.start(name, sock, log)
    else:
        spec = SimGuestSpec(name=name, ram_bytes=32 * MiB, socket=sock, workload="idle")
        guest = GuestProcess.start(spec, log=log, timeout=120)
    return guest, spawned, time.time()


def run(args: argparse.Namespace, workdir: Path, label: str, tree: Path | None) -> ChurnResult:
    rng = random.Random(args.seed)
    names = [f"vm{i:02d}" for i in range(args.vms)]
    sockets = {n: workdir / f"{n}.qmp" for n in names}
    result = ChurnResult(label, args.vms, shutdowns_sent=dict.fromkeys(names, 0))
    guests: dict[str, Guest] = {}
    for name in names:
        guests[name], _, _ = _start_guest(args.guests, name, sockets[name], workdir / f"{name}.log")
    daemon = Daemon(workdir, sockets, tree)
    free: list[str] = list(names)
    lock = threading.Lock()
    pool: ThreadPoolExecutor | None = None
    try:
        for name in names:
            daemon.wait_up(name, guests[name].pid)
        time.sleep(3)
        result.before = daemon.resources()
        started = time.monotonic()

        def one_restart(index: int) -> None:
            with lock:
                name = free.pop(rng.randrange(len(free)))
                how = "term" if rng.random() < 0.5 else "kill"
                pause = rng.uniform(0, 0.5)
            guest = guests[name]
            daemon.wait_up(name, guest.pid)
            if how == "term":
                guest.stop(10)  # a SHUTDOWN to the attached reclaimd, then exit
                with lock:
                    result.shutdowns_sent[name] += 1
            else:
                guest.kill()
            time.sleep(pause)
            new, spawned, ready = _start_guest(
                args.guests, name, sockets[name], workdir / f"{name}.log"
            )
            guests[name] = new
            daemon.wait_up(name, new.pid)
            with lock:
                result.restarts.append(Restart(name, how, spawned, ready, new.pid))
                free.append(name)

        # Guests die with the thread that started them: the pool lives until they are stopped.
        pool = ThreadPoolExecutor(args.concurrency)
        for future in [pool.submit(one_restart, i) for i in range(args.cycles)]:
            future.result()
        result.seconds = time.monotonic() - started
        for name in names:
            daemon.wait_up(name, guests[name].pid)
        time.sleep(5)
        result.after = daemon.resources()
    finally:
        daemon.stop()
        for guest in guests.values():
            guest.stop(5)
        if pool is not None:
            pool.shutdown()
    with Journal(daemon.journal) as journal:
        for name in names:
            entries = journal.entries(name, limit=10**6)
            attaches = {e.data.get("pid"): e.recorded_at for e in entries if e.kind == "attach"}
            for restart in result.restarts:
                if restart.vm == name:
                    restart.up_at = attaches.get(restart.pid)
            result.shutdowns_recorded[name] = sum(
                1 for e in entries if e.kind == "event" and e.name == "SHUTDOWN"
            )
    return result


def markdown(r: ChurnResult) -> str:
    spawn = [x.up_at - x.spawned_at for x in r.restarts if x.up_at is not None]
    ready = [x.up_at - x.ready_at for x in r.restarts if x.up_at is not None]
    missing = sum(1 for x in r.restarts if x.up_at is None)

    def row(what: str, values: list[float]) -> str:
        if not values:
            return f"| {what} | | | | |"
        return (
            f"| {what} | {statistics.median(values):.2f} | {pct(values, 0.99):.2f} | "
            f"{max(values):.2f} | {len(values)} |"
        )

    by_how = {how: [x for x in r.restarts if x.how == how and x.up_at] for how in ("term", "kill")}
    sent, recorded = sum(r.shutdowns_sent.values()), sum(r.shutdowns_recorded.values())
    lost = sum(
        max(0, r.shutdowns_sent[n] - r.shutdowns_recorded.get(n, 0)) for n in r.shutdowns_sent
    )
    lines = [
        f"### {r.label}",
        "",
        f"{len(r.restarts)} restarts of {r.vms} VMs in {r.seconds:.0f} s.",
        "",
        "| seconds | p50 | p99 | max | restarts |",
        "|---|---:|---:|---:|---:|",
        row("restart-to-up (new guest started -> reclaimd attached)", spawn),
        row("ready-to-up (new guest's socket accepting -> attached)", ready),
        *(
            row(
                f"restart-to-up after SIG{how.upper()}",
                [x.up_at - x.spawned_at for x in v if x.up_at],
            )
            for how, v in by_how.items()
        ),
        "",
        f"- SHUTDOWN events sent to an attached reclaimd: {sent}; in the journal: {recorded}; "
        f"lost: {lost}",
        f"- restarts without an attach of the new guest in the journal: {missing}",
        "",
        "| daemon | before | after |",
        "|---|---:|---:|",
        *(
            f"| {k} | {r.before.get(k, float('nan')):.0f} | {r.after.get(k, float('nan')):.0f} |"
            for k in ("open descriptors", "threads", "event-loop tasks")
            if k in r.before or k in r.after
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", choices=("qemu", "sim"), default="qemu")
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", metavar="REV", help="also run git revision REV's daemon")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = before_after(
        args.baseline,
        "rd-churn-",
        lambda workdir, label, tree: run(args, workdir, label, tree),
        markdown,
    )
    section = (
        f"## {args.vms} {'QEMUs' if args.guests == 'qemu' else 'simulated guests'}, "
        f"{args.cycles} restarts, {args.concurrency} at a time\n\n"
        + "\n\n".join(markdown(r) for r in results)
    )
    text = write_results(args.results, "Restart-to-up under churn", "bench_churn.py", section)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
