"""reclaimd against simulated guests at fleet scale: responsiveness, CPU and memory.

``fleet``: N simulated guests (one forked process each, ``python -m daemon.simguest fleet``)
and ``reclaimd serve`` attached to all of them through ``RECLAIMD_SOCKET_GLOB`` with a 2 s
stats interval. After a warm-up, a client times REST requests (one VM's detail, the VM list,
``/healthz``) and full ``/metrics`` scrapes while the daemon's CPU time and RSS are read from
``/proc``. Targets: REST p99 < 100 ms, a full scrape < 250 ms.

The estimate's accuracy against the guests' truth is ``bench_estimate.py``.

``fleet --baseline REV`` runs the daemon of git revision REV (its ``daemon`` and ``api``
packages, extracted to a temporary directory) against the same fleet as this tree's, in turns
(``--rounds`` each), and prints both side by side: medians, with min and max over the rounds.

Usage: python bench/bench_fleet.py [fleet] [--count 500] [--ram 32M] [--baseline REV] ...
Results go to bench/RESULTS-fleet.md (``--results``). The fleet run needs about 6 GiB of free
RAM for 500 guests of 32 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from machine import cpu_model  # bench/machine.py: scripts run from bench/

from daemon.model.cli import parse_size
from daemon.simguest.launcher import FleetProcess

MiB = 1 << 20
RESULTS = Path(__file__).with_name("RESULTS-fleet.md")
FLEET_WORKLOADS = ("idle",) * 7 + ("fragment", "memhog", "pagecache")
ACCURACY_WORKLOADS = ("memhog", "fragment", "pagecache", "idle")
FLEET_TICK = 1.0  # seconds between guest steps; stats requests are answered on time anyway
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- machine and /proc


def machine() -> dict[str, str]:
    model = cpu_model()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "CPU": f"{model}, {os.cpu_count()} cores",
        "Memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "Kernel": platform.release(),
        "Python": platform.python_version(),
    }


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


REPO = Path(__file__).resolve().parent.parent


def daemon_process(args: list[str], env: dict[str, str], tree: Path | None) -> list[str]:
    """The command line of ``reclaimd ARGS`` from ``tree`` (None: this one), setting ``env``'s
    PYTHONPATH. ``-P``: without it ``python -m`` puts the working directory first on the path,
    and a baseline started from the repository would run this tree's packages, not ``tree``'s."""
    env["PYTHONPATH"] = str(tree if tree is not None else REPO)
    return [sys.executable, "-P", "-m", "daemon.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------- the daemon


class Daemon:
    """``reclaimd serve`` in a child process, attached through a socket glob."""

    def __init__(self, workdir: Path, glob: str, log: Path, tree: Path | None = None) -> None:
        """``tree``: run the daemon of another revision (a directory with its packages)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("RECLAIMD_")]:
            del env[key]
        if tree is None:
            env.update(THIS_TREE_ENV)  # settings only this tree has (--this-tree-env)
        env.update(
            RECLAIMD_SOCKET_GLOB=glob,
            RECLAIMD_JOURNAL=str(workdir / "journal.sqlite3"),
            RECLAIMD_STATS_INTERVAL="2",
            RECLAIMD_POLL_INTERVAL="2",
        )
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                daemon_process(["serve", "--listen", f"127.0.0.1:{self.port}"], env, tree),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(base_url=self.base, timeout=30.0)

    @property
    def pid(self) -> int:
        return self.process.pid

    def health(self) -> dict[str, Any]:
        reply = self.client.get("/healthz")
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        return body

    def wait_up(self, count: int, timeout: float) -> float:
        """Seconds until ``count`` VMs have a running session."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"reclaimd exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if self.health()["vms_up"] >= count:
                    return time.monotonic() - started
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {count} VMs up after {timeout:g} s")

    def stop(self) -> None:
        self.client.close()
        terminate(self.process)


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a service manager would, and SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


Result = TypeVar("Result")


def before_after(
    baseline: str | None,
    prefix: str,
    run: Callable[[Path, str, Path | None], Result],
    show: Callable[[Result], str],
) -> list[Result]:
    """``run(workdir, label, tree)`` for git revision ``baseline``'s daemon (when given), then
    this tree's (``tree`` None), each in a fresh work directory; each result printed as it
    comes."""
    workroot = Path(tempfile.mkdtemp(prefix=prefix))
    results: list[Result] = []
    try:
        runs: list[tuple[str, Path | None]] = []
        if baseline:
            runs.append((f"before: {baseline}", extract_revision(baseline, workroot / "base")))
        runs.append(("after: this tree", None))
        for label, tree in runs:
            workdir = workroot / f"run{len(results)}"
            workdir.mkdir()
            results.append(run(workdir, label, tree))
            print(show(results[-1]), flush=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    return results


@contextlib.contextmanager
def daemon(workdir: Path, glob: str, tree: Path | None = None) -> Iterator[Daemon]:
    d = Daemon(workdir, glob, workdir / f"reclaimd-{time.monotonic_ns()}.log", tree)
    try:
        yield d
    finally:
        d.stop()


# ---------------------------------------------------------------------------- fleet


@dataclass
class FleetResult:
    count: int
    ram_bytes: int
    workloads: tuple[str, ...]
    fleet_start_s: float
    attach_s: float
    window_s: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    scrape_bytes: int = 0
    daemon_cpu: float = 0.0  # fraction of one core over the window
    daemon_rss: int = 0
    daemon_rss_idle: int = 0
    fleet_cpu: float = 0.0
    fleet_pss: int = 0
    stats_fresh: int = 0
    vms_seen: int = 0
    scan_ages: list[float] = field(default_factory=list)  # seconds since each VM's last scan
    sched_idle: bool = False


def idle_daemon_rss(workdir: Path, tree: Path | None = None) -> int:
    empty = workdir / "empty"
    empty.mkdir(exist_ok=True)
    with daemon(workdir, str(empty / "*.qmp"), tree) as d:
        d.wait_up(0, 60)
        time.sleep(5)
        return rss_bytes(d.pid)


def run_fleet(
    args: argparse.Namespace, workdir: Path, trees: dict[str, Path | None]
) -> dict[str, list[FleetResult]]:
    """One fleet; each daemon of ``trees`` (label -> packages, None: this tree) measured
    against it ``args.rounds`` times, in turns."""
    idle_rss = {label: idle_daemon_rss(workdir, tree) for label, tree in trees.items()}
    vms = workdir / "vms"
    started = time.monotonic()
    results: dict[str, list[FleetResult]] = {label: [] for label in trees}
    with FleetProcess.start(
        count=args.count,
        directory=vms,
        ram_bytes=args.ram,
        workloads=FLEET_WORKLOADS,
        tick=FLEET_TICK,
        sched_idle=args.sched_idle,
        log=workdir / "fleet.log",
    ) as fleet:
        fleet_start = time.monotonic() - started
        print(f"fleet of {args.count} up in {fleet_start:.1f} s", file=sys.stderr)
        for round_ in range(args.rounds):
            for label, tree in trees.items():
                with daemon(workdir, str(vms / "*.qmp"), tree) as d:
                    attach = d.wait_up(args.count, 600)
                    print(
                        f"round {round_ + 1}, {label}: all attached in {attach:.1f} s; warming up",
                        file=sys.stderr,
                    )
                    time.sleep(args.warmup)
                    result = FleetResult(
                        args.count,
                        args.ram,
                        FLEET_WORKLOADS,
                        fleet_start,
                        attach,
                        args.duration,
                        sched_idle=args.sched_idle,
                    )
                    measure(d, fleet, args, result)
                    result.daemon_rss_idle = idle_rss[label]
                    results[label].append(result)
    return results


def extract_revision(rev: str, dest: Path) -> Path:
    """The ``daemon`` and ``api`` packages of git revision ``rev``, under ``dest``."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent.parent), "archive", rev, "daemon", "api"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measure(d: Daemon, fleet: FleetProcess, args: argparse.Namespace, r: FleetResult) -> None:
    names = [p.stem for p in fleet.sockets]
    fleet_pids = [fleet.pid, *children(fleet.pid)]
    rand = random.Random(1)
    lat: dict[str, list[float]] = {"vm detail": [], "vm list": [], "healthz": [], "metrics": []}
    cpu0 = cpu_seconds(d.pid)
    fleet_cpu0 = sum(cpu_seconds(p) for p in fleet_pids)
    t0 = time.monotonic()
    next_scrape = t0
    i = 0
    while (now := time.monotonic()) - t0 < args.duration:
        if now >= next_scrape:
            start = time.perf_counter()
            reply = d.client.get("/metrics")
            lat["metrics"].append(time.perf_counter() - start)
            reply.raise_for_status()
            r.scrape_bytes = len(reply.content)
            next_scrape = now + 5.0
        kind, path = (
            ("vm list", "/api/v1/vms")
            if i % 10 == 0
            else ("healthz", "/healthz")
            if i % 10 == 5
            else ("vm detail", f"/api/v1/vms/{rand.choice(names)}")
        )
        start = time.perf_counter()
        d.client.get(path).raise_for_status()
        lat[kind].append(time.perf_counter() - start)
        i += 1
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    r.daemon_cpu = (cpu_seconds(d.pid) - cpu0) / elapsed
    r.fleet_cpu = (sum(cpu_seconds(p) for p in fleet_pids) - fleet_cpu0) / elapsed
    r.daemon_rss = rss_bytes(d.pid)
    r.fleet_pss = sum(pss_bytes(p) for p in fleet_pids)
    r.latencies = lat
    vms = d.client.get("/api/v1/vms").json()["vms"]
    r.vms_seen = len(vms)
    r.stats_fresh = sum(
        1 for vm in vms if vm.get("up") and (vm.get("stats_age_seconds") or 1e9) < 10
    )
    # How fresh the host view is when the CPU budget is shared by every VM.
    for vm in vms:
        host = d.client.get(f"/api/v1/vms/{vm['name']}").json().get("host") or {}
        if host.get("at") is not None:
            r.scan_ages.append(time.time() - host["at"])


def fleet_markdown(r: FleetResult) -> str:
    def ms(values: list[float], q: float) -> str:
        return f"{pct(values, q) * 1000:.1f}"

    rows = [
        f"| {kind} | {len(v)} | {ms(v, 0.5)} | {ms(v, 0.99)} | {max(v) * 1000:.1f} |"
        for kind, v in r.latencies.items()
        if v
    ]
    rest = [x for k, v in r.latencies.items() if k != "metrics" for x in v]
    rest_p99 = pct(rest, 0.99) * 1000
    scrape_max = max(r.latencies["metrics"]) * 1000
    per_vm = (r.daemon_rss - r.daemon_rss_idle) / r.count
    return "\n".join(
        [
            f"Fleet: {r.count} simulated guests of {r.ram_bytes // MiB} MiB, one process each, "
            f"workloads in turn: {', '.join(r.workloads)}; stats interval 2 s, poll interval 2 s; "
            f"guests step every {FLEET_TICK:g} s"
            + (
                " under SCHED_IDLE (they get only CPU time the daemon does not want)."
                if r.sched_idle
                else " at normal priority."
            ),
            f"Fleet up in {r.fleet_start_s:.1f} s; the daemon had all {r.count} attached "
            f"{r.attach_s:.1f} s after it started. Measured over {r.window_s:g} s after warm-up.",
            "",
            "| request | n | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"- REST p99 (all REST requests): **{rest_p99:.1f} ms** (target < 100 ms: "
            f"{'met' if rest_p99 < 100 else 'NOT met'})",
            f"- Full /metrics scrape: max **{scrape_max:.1f} ms**, {r.scrape_bytes / 1024:.0f} KiB "
            f"(target < 250 ms: {'met' if scrape_max < 250 else 'NOT met'})",
            f"- Daemon CPU: **{r.daemon_cpu * 100:.1f} % of one core** "
            f"({r.daemon_cpu / r.count * 1e5:.1f} % per 1000 VMs)",
            f"- Daemon RSS: {r.daemon_rss / MiB:.0f} MiB with {r.count} VMs, "
            f"{r.daemon_rss_idle / MiB:.0f} MiB with none: **{per_vm / 1024:.0f} KiB per VM**",
            f"- VMs listed {r.vms_seen}, with guest stats younger than 10 s: {r.stats_fresh}",
            f"- Host view: {len(r.scan_ages)} VMs scanned; time since each VM's last residency "
            f"scan: median {pct(r.scan_ages, 0.5):.1f} s, p90 {pct(r.scan_ages, 0.9):.1f} s, "
            f"max {max(r.scan_ages):.1f} s (all VMs share the default scan budget)"
            if r.scan_ages
            else "- Host view: no VM scanned",
            f"- The simulated fleet itself: {r.fleet_cpu * 100:.1f} % of one core, "
            f"{r.fleet_pss / MiB:.0f} MiB PSS in all ({r.fleet_pss / r.count / MiB:.1f} MiB per "
            "guest, guest RAM included)",
        ]
    )


def headline(r: FleetResult) -> dict[str, float]:
    """The figures compared between daemons."""
    rest = [x for k, v in r.latencies.items() if k != "metrics" for x in v]
    return {
        "REST p99 ms (all requests)": pct(rest, 0.99) * 1000,
        "VM list p99 ms": pct(r.latencies["vm list"], 0.99) * 1000,
        "VM detail max ms": max(r.latencies["vm detail"]) * 1000,
        "/metrics max ms": max(r.latencies["metrics"]) * 1000,
        "daemon CPU, % of one core": r.daemon_cpu * 100,
        "daemon CPU per VM per poll, ms": r.daemon_cpu / r.count * 2.0 * 1000,
        "memory per VM, KiB": (r.daemon_rss - r.daemon_rss_idle) / r.count / 1024,
        "host view age p50 s": pct(r.scan_ages, 0.5) if r.scan_ages else float("nan"),
        "host view age p99 s": pct(r.scan_ages, 0.99) if r.scan_ages else float("nan"),
        "host view age max s": max(r.scan_ages) if r.scan_ages else float("nan"),
    }


def comparison_markdown(results: dict[str, list[FleetResult]], labels: dict[str, str]) -> str:
    """Medians (min - max) over the rounds, one column per daemon."""
    figures = {label: [headline(r) for r in runs] for label, runs in results.items()}
    names = list(next(iter(figures.values()))[0])
    head = "| figure | " + " | ".join(labels[label] for label in figures) + " |"
    lines = [head, "|---|" + "---:|" * len(figures)]
    for name in names:
        cells = []
        for runs in figures.values():
            values = sorted(run[name] for run in runs)
            med = statistics.median(values)
            cells.append(f"{med:.1f} ({values[0]:.1f} - {values[-1]:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rounds = len(next(iter(results.values())))
    return "\n".join(
        [
            f"The daemons in turn against one fleet, {rounds} round(s) each: median (min - max).",
            "",
            *lines,
        ]
    )


# ---------------------------------------------------------------------------- main


def merge(path: Path, sections: list[str]) -> list[str]:
    """This run's sections, plus the sections of ``path`` this run did not redo."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        return sections
    fresh = {s.splitlines()[0] for s in sections}
    kept = [
        "## " + part.rstrip()
        for part in old.split("\n## ")[1:]
        if "## " + part.splitlines()[0] not in fresh
    ]
    return sections + kept


def write_results(path: Path, title: str, script: str, section: str) -> str:
    """Write ``path``: a header (the command, the machine, the load), this run's section and
    the sections of earlier runs it did not redo; returns the text."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = [
        f"# {title}",
        "",
        f"Command: `python bench/{script} {' '.join(sys.argv[1:])}` "
        f"(run {time.strftime('%Y-%m-%d')})",
        "",
        *(f"- {k}: {v}" for k, v in machine().items()),
        f"- Load average at the end (other work on the machine): {load}",
        "",
    ]
    text = "\n".join(header) + "\n" + "\n\n".join(merge(path, [section])) + "\n"
    path.write_text(text)
    return text


THIS_TREE_ENV: dict[str, str] = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("fleet",), default="fleet")
    parser.add_argument(
        "--this-tree-env",
        action="append",
        default=[],
        metavar="RECLAIMD_X=VALUE",
        help="a setting for this tree's daemon only (e.g. RECLAIMD_AGENTS=false)",
    )
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--ram", type=parse_size, default=32 * MiB, help="RAM per fleet guest")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=60.0, help="fleet window, seconds")
    parser.add_argument(
        "--no-sched-idle",
        dest="sched_idle",
        action="store_false",
        help="run the simulated guests at normal priority (default: SCHED_IDLE)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--baseline", metavar="REV", help="also run git revision REV's daemon")
    parser.add_argument("--rounds", type=int, default=1, help="fleet runs per daemon, in turns")
    args = parser.parse_args()
    THIS_TREE_ENV.update(item.split("=", 1) for item in args.this_tree_env)

    sections = []
    workdir = Path(tempfile.mkdtemp(prefix="rd-fleet-"))
    try:
        if args.what == "fleet":
            trees: dict[str, Path | None] = {"this tree": None}
            labels = {"this tree": "this tree"}
            if args.baseline:
                trees["baseline"] = extract_revision(args.baseline, workdir / "baseline")
                labels["baseline"] = f"baseline {args.baseline}"
            results = run_fleet(args, workdir, trees)
            text = fleet_markdown(results["this tree"][-1])
            if len(trees) > 1 or args.rounds > 1:
                text += "\n\n" + comparison_markdown(results, labels)
            sections.append("## Fleet scale\n\n" + text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    info = machine()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = [
        "# Simulated guests at fleet scale",
        "",
        f"Command: `python bench/bench_fleet.py {' '.join(sys.argv[1:]) or 'all'}` "
        f"(run {time.strftime('%Y-%m-%d')})",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- Load average at the end (other work on the machine): {load}",
        "",
    ]
    text = "\n".join(header) + "\n" + "\n\n".join(merge(args.results, sections)) + "\n"
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
