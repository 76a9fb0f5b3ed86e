"""What the libvirt source costs, and what Debian's libvirt exporter shows, on real domains.

A private libvirtd (``tests/libvirt/libvirtd.py``: the packaged daemons as root, in their own
mount namespace) runs one booted test guest (256 MiB, stats every 2 s) and up to --domains
cheap paused ones (64 MiB, TCG). Measured:

- one ``memoryStats()`` of the booted guest: the binding called directly, and
  ``LibvirtSource.memory_stats`` (worker thread + parsing); latency, and CPU of this process,
  of libvirtd and of that QEMU per call (libvirtd asks QEMU ``query-balloon`` and
  ``qom-get guest-stats`` on every call);
- listing the running domains, and one "cycle" of memoryStats over every domain (concurrent
  through the source's 4 workers), against the single ``getAllDomainStats(BALLOON)`` call, for
  each domain count;
- ``prometheus-libvirt-exporter`` (Debian's, the kumina exporter) against the same libvirtd:
  its command line, scrape time, its CPU per scrape, series per domain and their names;
- ``reclaimd serve --libvirt`` on the same domains: the same, plus its steady CPU between
  scrapes (polls, scans) and libvirtd's meanwhile, side by side with the exporter.

    python bench/bench_libvirt.py [--domains 10,40] [--calls 200] [--scrapes 20] [--window 20]

Results go to bench/RESULTS-libvirt.md (``--output``). Needs root, libvirt-daemon-system,
libvirt-clients, qemu-system-x86 and prometheus-libvirt-exporter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libvirt
from machine import cpu_model  # bench/machine.py: scripts run from bench/
from prometheus_client.parser import text_string_to_metric_families

from daemon.libvirt import LibvirtSource
from daemon.testguest import build_image
from tests.libvirt import domains
from tests.libvirt.domains import DomainSpec
from tests.libvirt.libvirtd import PrivateLibvirtd

EXPORTER = "prometheus-libvirt-exporter"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


@dataclass
class CallCost:
    p50: float
    p99: float
    self_cpu: float  # per call, this process
    libvirtd_cpu: float
    qemu_cpu: float


def measure_raw_memory_stats(dom: libvirt.virDomain, calls: int, pids: tuple[int, int]) -> CallCost:
    libvirtd_pid, qemu_pid = pids
    times = []
    c0, l0, q0 = time.process_time(), cpu_seconds(libvirtd_pid), cpu_seconds(qemu_pid)
    for _ in range(calls):
        t = time.perf_counter()
        dom.memoryStats()
        times.append(time.perf_counter() - t)
    c1, l1, q1 = time.process_time(), cpu_seconds(libvirtd_pid), cpu_seconds(qemu_pid)
    return CallCost(
        statistics.median(times),
        pct(times, 0.99),
        (c1 - c0) / calls,
        (l1 - l0) / calls,
        (q1 - q0) / calls,
    )


async def measure_source_memory_stats(
    source: LibvirtSource, uuid: str, calls: int, pids: tuple[int, int]
) -> CallCost:
    libvirtd_pid, qemu_pid = pids
    info = await source.info(uuid)
    times = []
    c0, l0, q0 = time.process_time(), cpu_seconds(libvirtd_pid), cpu_seconds(qemu_pid)
    for _ in range(calls):
        t = time.perf_counter()
        stats = await source.memory_stats(uuid, ram_bytes=info.max_memory_bytes)
        times.append(time.perf_counter() - t)
    c1, l1, q1 = time.process_time(), cpu_seconds(libvirtd_pid), cpu_seconds(qemu_pid)
    assert stats.guest.available and stats.guest.valid, stats
    return CallCost(
        statistics.median(times),
        pct(times, 0.99),
        (c1 - c0) / calls,
        (l1 - l0) / calls,
        (q1 - q0) / calls,
    )


@dataclass
class ScaleRow:
    domains: int
    list_p50: float
    cycle_wall: float
    cycle_self_cpu: float
    cycle_libvirtd_cpu: float
    bulk_wall: float
    bulk_self_cpu: float
    bulk_libvirtd_cpu: float


async def measure_scale(
    source: LibvirtSource, conn: libvirt.virConnect, libvirtd_pid: int, repeat: int = 10
) -> ScaleRow:
    refs = await source.list_running()
    lists = []
    for _ in range(repeat * 2):
        t = time.perf_counter()
        await source.list_running()
        lists.append(time.perf_counter() - t)
    walls, selfs, daemons = [], [], []
    for _ in range(repeat):
        c0, l0, t = time.process_time(), cpu_seconds(libvirtd_pid), time.perf_counter()
        await asyncio.gather(*(source.memory_stats(r.uuid) for r in refs))
        walls.append(time.perf_counter() - t)
        selfs.append(time.process_time() - c0)
        daemons.append(cpu_seconds(libvirtd_pid) - l0)
    bulk_walls, bulk_selfs, bulk_daemons = [], [], []
    flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
    for _ in range(repeat):
        c0, l0, t = time.process_time(), cpu_seconds(libvirtd_pid), time.perf_counter()
        got = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_BALLOON, flags)
        bulk_walls.append(time.perf_counter() - t)
        bulk_selfs.append(time.process_time() - c0)
        bulk_daemons.append(cpu_seconds(libvirtd_pid) - l0)
        assert len(got) == len(refs)
    return ScaleRow(
        len(refs),
        statistics.median(lists),
        statistics.median(walls),
        statistics.mean(selfs),
        statistics.mean(daemons),
        statistics.median(bulk_walls),
        statistics.mean(bulk_selfs),
        statistics.mean(bulk_daemons),
    )


@dataclass
class ExporterResult:
    argv: list[str]
    domains: int
    scrape_p50: float
    cpu_per_scrape: float
    series_total: int
    series_per_domain: dict[str, int]
    names_per_domain: list[str]
    live_memory: dict[str, float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def series_of(
    text: str, label: str, live_name: str, is_memory: Callable[[str, dict[str, str]], bool]
) -> tuple[int, dict[str, int], set[str], dict[str, float]]:
    """Of an exposition: the series in all, the series per value of ``label``, and the names
    and memory values (``is_memory(name, labels)``) of the series of ``label=live_name``."""
    per: dict[str, int] = defaultdict(int)
    names: set[str] = set()
    live: dict[str, float] = {}
    total = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            total += 1
            value = sample.labels.get(label)
            if value is None:
                continue
            per[value] += 1
            if value == live_name:
                names.add(sample.name)
                if is_memory(sample.name, sample.labels):
                    live[sample.name] = sample.value
    return total, dict(per), names, live


def measure_exporter(uri: str, live_name: str, scrapes: int) -> ExporterResult:
    port = free_port()
    argv = [EXPORTER, f"--web.listen-address=127.0.0.1:{port}", f"--libvirt.uri={uri}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{EXPORTER} did not answer on {url}") from None
                time.sleep(0.1)
        times = []
        c0 = cpu_seconds(proc.pid)
        text = ""
        for _ in range(scrapes):
            t = time.perf_counter()
            text = urllib.request.urlopen(url, timeout=30).read().decode()
            times.append(time.perf_counter() - t)
        cpu = (cpu_seconds(proc.pid) - c0) / scrapes
    finally:
        proc.terminate()
        proc.wait(10)
    total, per_domain, names, live = series_of(
        text, "domain", live_name, lambda name, _labels: "memory" in name
    )
    return ExporterResult(
        argv=[a.replace(uri, "URI") for a in argv],
        domains=len(per_domain),
        scrape_p50=statistics.median(times),
        cpu_per_scrape=cpu,
        series_total=total,
        series_per_domain=per_domain,
        names_per_domain=sorted(names),
        live_memory=live,
    )


@dataclass
class ReclaimdResult:
    vms: int
    attach_seconds: float  # from start until every domain was up
    cpu_per_second: float  # the daemon's own, steady state (polls, scans, agent)
    libvirtd_cpu_per_second: float  # libvirtd's meanwhile (answering the daemon, mostly)
    scrape_p50: float
    cpu_per_scrape: float  # above the steady rate
    series_total: int
    series_per_vm: dict[str, int]
    names_per_vm: list[str]
    live_memory: dict[str, float]


def measure_reclaimd(
    uri: str, live_name: str, expected: int, scrapes: int, libvirtd_pid: int, window: float
) -> ReclaimdResult:
    """``reclaimd serve --libvirt URI`` on the same domains, with its default settings."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rd-bench-"))
    env = {**os.environ, "RECLAIMD_JOURNAL": str(workdir / "journal.sqlite3")}
    argv = [sys.executable, "-m", "daemon.cli", "serve", "--libvirt", uri,
            "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/v1/vms", timeout=5) as reply:
                    vms = json.load(reply)["vms"]
                if sum(1 for v in vms if v["up"]) >= expected:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("reclaimd did not attach every domain in 60 s")
            time.sleep(0.1)
        attach = time.monotonic() - started
        time.sleep(5)  # past the first scans
        c0, l0, t0 = cpu_seconds(proc.pid), cpu_seconds(libvirtd_pid), time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        rate = (cpu_seconds(proc.pid) - c0) / elapsed
        libvirtd_rate = (cpu_seconds(libvirtd_pid) - l0) / elapsed
        times = []
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        text = ""
        for _ in range(scrapes):
            t = time.perf_counter()
            text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
            times.append(time.perf_counter() - t)
        scrape_cpu = cpu_seconds(proc.pid) - c0 - rate * (time.monotonic() - t0)
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(workdir, ignore_errors=True)
    total, per_vm, names, live = series_of(
        text,
        "vm",
        live_name,
        lambda name, labels: name.endswith("_bytes") and set(labels) == {"vm"},
    )
    return ReclaimdResult(
        vms=len(per_vm),
        attach_seconds=attach,
        cpu_per_second=rate,
        libvirtd_cpu_per_second=libvirtd_rate,
        scrape_p50=statistics.median(times),
        cpu_per_scrape=max(0.0, scrape_cpu / scrapes),
        series_total=total,
        series_per_vm=per_vm,
        names_per_vm=sorted(names),
        live_memory=live,
    )


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


async def run(args: argparse.Namespace, libvirtd: PrivateLibvirtd) -> str:
    image = build_image()
    domains.install_image(image, libvirtd)
    live = DomainSpec(name="bench-live", ram_mib=256)
    domains.define(live, libvirtd)
    domains.start(live, libvirtd)
    domains.wait_ready(live, libvirtd).close()
    assert libvirtd.libvirtd_pid is not None
    libvirtd_pid = libvirtd.libvirtd_pid
    qemu_pid = int((libvirtd.qemu_state_dir / "bench-live.pid").read_text())
    pids = (libvirtd_pid, qemu_pid)
    await asyncio.sleep(3)  # the first stats

    conn = libvirt.open(libvirtd.uri)
    raw = measure_raw_memory_stats(conn.lookupByName("bench-live"), args.calls, pids)
    rows: list[ScaleRow] = []
    async with LibvirtSource(libvirtd.uri, state_dir=libvirtd.qemu_state_dir) as source:
        await source.wait_connected(30)
        ours = await measure_source_memory_stats(source, live.uuid, args.calls, pids)
        made = 0
        for count in args.domains:
            while made < count - 1:  # the booted guest counts as one
                spec = DomainSpec(name=f"bench-paused-{made}", ram_mib=64, stats_period=2)
                domains.define(spec, libvirtd)
                domains.start(spec, libvirtd, paused=True)
                made += 1
            rows.append(await measure_scale(source, conn, libvirtd_pid))
            print(f"{count} domains: {rows[-1]}", flush=True)
    exporter = measure_exporter(libvirtd.uri, "bench-live", args.scrapes)
    daemon = measure_reclaimd(
        libvirtd.uri, "bench-live", rows[-1].domains, args.scrapes, libvirtd_pid, args.window
    )
    conn.close()
    return report(args, raw, ours, rows, exporter, daemon)


def report(
    args: argparse.Namespace,
    raw: CallCost,
    ours: CallCost,
    rows: list[ScaleRow],
    exporter: ExporterResult,
    daemon: ReclaimdResult,
) -> str:
    lines = [
        "# libvirt source: cost of the calls, and Debian's libvirt exporter",
        "",
        f"Run: `python bench/bench_libvirt.py --domains {','.join(map(str, args.domains))} "
        f"--calls {args.calls} --scrapes {args.scrapes} --window {args.window:g}` on "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores (shared with other work while this ran)",
        f"- Kernel {platform.release()}, Python {platform.python_version()}",
        f"- {tool_version(['libvirtd', '--version'])}; libvirt-python {version('libvirt-python')}",
        f"- {tool_version(['qemu-system-x86_64', '--version'])}, TCG (KVM unusable here)",
        f"- {EXPORTER} {tool_version(['dpkg-query', '-W', '-f=${Version}', EXPORTER])}",
        "- libvirtd: the packaged daemon as root in a private mount namespace "
        "(tests/libvirt/libvirtd.py), reached as `qemu+unix:///system?socket=...`",
        "",
        "## One memoryStats() of a booted guest",
        "",
        f"{args.calls} calls in a row; CPU is per call (10 ms clock ticks averaged over the run).",
        "",
        "| path | p50 | p99 | CPU here | CPU libvirtd | CPU QEMU |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in (("binding, direct", raw), ("LibvirtSource.memory_stats", ours)):
        lines.append(
            f"| {name} | {ms(c.p50)} | {ms(c.p99)} | {ms(c.self_cpu)} | "
            f"{ms(c.libvirtd_cpu)} | {ms(c.qemu_cpu)} |"
        )
    lines += [
        "",
        "## N domains (1 booted, the rest paused, all with a 2 s stats period)",
        "",
        "`list` is `list_running()` (listAllDomains). `cycle` is `memory_stats` of every domain"
        " at once through the source (4 worker threads). `bulk` is one"
        " `getAllDomainStats(VIR_DOMAIN_STATS_BALLOON)`. CPU per cycle or bulk call.",
        "",
        "| domains | list p50 | cycle wall | cycle CPU here | cycle CPU libvirtd |"
        " bulk wall | bulk CPU here | bulk CPU libvirtd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.domains} | {ms(r.list_p50)} | {ms(r.cycle_wall)} | {ms(r.cycle_self_cpu)} | "
            f"{ms(r.cycle_libvirtd_cpu)} | {ms(r.bulk_wall)} | {ms(r.bulk_self_cpu)} | "
            f"{ms(r.bulk_libvirtd_cpu)} |"
        )
    big = rows[-1]
    lines += [
        "",
        f"Per domain and cycle at {big.domains} domains: {ms(big.cycle_self_cpu / big.domains)}"
        f" of CPU here and {ms(big.cycle_libvirtd_cpu / big.domains)} in libvirtd (plus QEMU's"
        " share, as above). The bulk call costs this process"
        f" {ms(big.bulk_self_cpu / big.domains)} per domain, but libvirtd takes as much and"
        " asks the domains one after another, so its wall time grows with the count"
        f" ({ms(big.bulk_wall)}) and one slow domain delays all.",
    ]
    per = sorted(set(exporter.series_per_domain.values()))
    lines += [
        "",
        f"## {EXPORTER} on the same {exporter.domains} domains",
        "",
        f"Command line: `{' '.join(exporter.argv)}` (URI: the private libvirtd's; the package's"
        " default is `--web.listen-address=:9177 --libvirt.uri=qemu:///system`, arguments in"
        f" `/etc/default/{EXPORTER}` ARGS, unit runs it as user prometheus;"
        " `--libvirt.export-nova-metadata` adds Nova labels).",
        "",
        f"- scrape p50 {ms(exporter.scrape_p50)}, exporter CPU {ms(exporter.cpu_per_scrape)}"
        f" per scrape ({args.scrapes} scrapes)",
        f"- {exporter.series_total} series in all; per domain: {', '.join(map(str, per))}",
        "- per domain it exports: " + ", ".join(f"`{n}`" for n in exporter.names_per_domain),
        "- its memory facts for the booted guest: "
        + ", ".join(f"`{k}` = {v / (1 << 20):.0f} MiB" for k, v in exporter.live_memory.items())
        + " (maximum = `<memory>`, usage = the balloon's current size: no guest statistics, "
        "no free, available or cache, no free page reporting, nothing from the host's view)",
        "",
    ]
    ours_per = sorted(set(daemon.series_per_vm.values()))
    n = daemon.vms
    lines += [
        f"## reclaimd serve --libvirt on the same {n} domains, side by side",
        "",
        "`reclaimd serve --libvirt URI` with its defaults (poll every 2 s, host scans within the"
        " 0.05 CPU-s/s budget, the agent where there is one), started after the exporter"
        f" stopped. Steady CPU over {args.window:g} s, five seconds after every domain was up;"
        " scrape CPU is what the scrapes added above that rate.",
        "",
        f"| | {EXPORTER} | reclaimd |",
        "|---|---|---|",
        f"| scrape p50 | {ms(exporter.scrape_p50)} | {ms(daemon.scrape_p50)} |",
        f"| CPU per scrape | {ms(exporter.cpu_per_scrape)} | {ms(daemon.cpu_per_scrape)} |",
        f"| CPU per scrape and VM | {ms(exporter.cpu_per_scrape / max(1, exporter.domains))}"
        f" | {ms(daemon.cpu_per_scrape / max(1, n))} |",
        f"| series in all | {exporter.series_total} | {daemon.series_total} |",
        f"| series per VM | {', '.join(map(str, per))} | {', '.join(map(str, ours_per))} |",
        f"| CPU between scrapes | none (reads at scrape time) | {daemon.cpu_per_second * 1000:.1f}"
        f" ms/s ({daemon.cpu_per_second * 1000 / max(1, n):.2f} ms/s per VM); libvirtd"
        f" {daemon.libvirtd_cpu_per_second * 1000:.1f} ms/s meanwhile |",
        f"| every domain attached | - | {daemon.attach_seconds:.1f} s after start |",
        "",
        "reclaimd's memory facts for the booted guest (its bytes series labelled only"
        ' `vm="bench-live"`; the free lists by order are one series per order): '
        + ", ".join(
            f"`{k}` = {v / (1 << 20):.1f} MiB" for k, v in sorted(daemon.live_memory.items())
        ),
        "",
        "All its series for one VM: " + ", ".join(f"`{x}`" for x in daemon.names_per_vm),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--domains", type=lambda s: [int(x) for x in s.split(",")], default=[10, 40]
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--window", type=float, default=20.0, help="s of reclaimd's steady CPU")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "RESULTS-libvirt.md"
    )
    args = parser.parse_args()
    if shutil.which(EXPORTER) is None:
        sys.exit(f"{EXPORTER} not found: apt-get install {EXPORTER}")
    root = Path(tempfile.mkdtemp(prefix="reclaimd-libvirtd-", dir="/tmp"))
    libvirtd = PrivateLibvirtd(root)
    try:
        libvirtd.start()
        text = asyncio.run(run(args, libvirtd))
    finally:
        libvirtd.stop()
        shutil.rmtree(root, ignore_errors=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
