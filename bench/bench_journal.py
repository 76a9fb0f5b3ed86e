"""Benchmark of the event journal: append latency and throughput, reads at a million entries.

Writes its numbers and the machine they were measured on to RESULTS-journal.md beside this file
(or --output). Single-threaded; about a minute with the defaults, a few seconds with --quick.

    python bench/bench_journal.py [--quick] [--dir DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from machine import cpu_model  # bench/machine.py: scripts run from bench/

from daemon.journal import Journal, NewEntry

VMS = 50
DAY = 86400.0


def machine() -> dict[str, str]:
    cpu = cpu_model()
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "SQLite": sqlite3.sqlite_version,
    }


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (longest mount prefix)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and target.startswith(fields[1]) and len(fields[1]) > len(best):
            best, kind = fields[1], f"{fields[2]} ({fields[0]})"
    return kind


def percentiles(samples: list[float]) -> dict[str, float]:
    """Microseconds."""
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "mean": statistics.fmean(ordered) * 1e6,
        "p50": ordered[n // 2] * 1e6,
        "p99": ordered[min(n - 1, int(n * 0.99))] * 1e6,
        "p99.9": ordered[min(n - 1, int(n * 0.999))] * 1e6,
        "max": ordered[-1] * 1e6,
    }


def event(i: int) -> tuple[str, str, str, dict[str, int], float]:
    """A typical QMP event: BALLOON_CHANGE of one of VMS machines."""
    return (f"vm{i % VMS}", "event", "BALLOON_CHANGE", {"actual": (1 << 30) - i}, time.time())


def timed_appends(journal: Journal, n: int) -> list[float]:
    """``append``: submit and wait for the commit, one at a time (a blocking caller)."""
    samples = []
    clock = time.perf_counter
    for i in range(n):
        vm, kind, name, data, qemu_time = event(i)
        start = clock()
        journal.append(vm, kind, name, data, qemu_time)
        samples.append(clock() - start)
    return samples


def timed_submits(journal: Journal, n: int) -> tuple[list[float], float]:
    """``submit`` as the daemon's event loop does, as fast as it can: the time of each call on
    the caller's thread, and the entries acknowledged per second (submit to the last commit)."""
    samples = []
    clock = time.perf_counter
    began = clock()
    for i in range(n):
        vm, kind, name, data, qemu_time = event(i)
        start = clock()
        while journal.submit(vm, kind, name, data, qemu_time) is None:  # saturated: wait
            time.sleep(0.001)
        samples.append(clock() - start)
    journal.flush()
    return samples, n / (clock() - began)


def prefill(journal: Journal, n: int, *, vms: int, start: float, step: float) -> None:
    batch = 10_000
    for first in range(0, n, batch):
        journal.append_many(
            NewEntry(
                f"vm{i % vms}", "event", "BALLOON_CHANGE", {"actual": i}, None, start + i * step
            )
            for i in range(first, min(n, first + batch))
        )


def bench_appends(base: Path, n: int) -> dict[str, dict[str, float]]:
    results = {}
    with Journal(base / "submit.sqlite3") as j:
        timed_submits(j, 1000)  # warm up: statement cache, first pages
        samples, per_s = timed_submits(j, n)
    results["submit (the daemon's path), fresh journal"] = {**percentiles(samples), "per_s": per_s}
    with Journal(base / "fresh.sqlite3") as j:
        timed_appends(j, 1000)  # warm up: statement cache, first pages
        samples = timed_appends(j, n)
    results["append (submit, wait for the commit), fresh journal"] = {
        **percentiles(samples),
        "per_s": n / sum(samples),
    }

    # Steady state: full to max_events, so every prune_every appends delete as many old rows.
    limit = max(10 * n, 100_000)
    path = base / "steady.sqlite3"
    with Journal(path, max_events=limit, prune_every=10**9) as j:
        prefill(j, limit, vms=VMS, start=time.time() - DAY, step=DAY / limit)
    with Journal(path, max_events=limit) as j:
        samples, per_s = timed_submits(j, n)
    results[f"submit, at retention limit ({limit:,} entries, prune every 1000)"] = {
        **percentiles(samples),
        "per_s": per_s,
    }

    with Journal(base / "batch.sqlite3") as j:
        rows = [NewEntry(*event(i)) for i in range(n)]
        start = time.perf_counter()
        for first in range(0, n, 100):
            j.append_many(rows[first : first + 100])
        elapsed = time.perf_counter() - start
    results["append_many, batches of 100"] = {"mean": elapsed / n * 1e6, "per_s": n / elapsed}
    return results


def time_query(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best of `repeat`, milliseconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def read_queries(
    j: Journal, vms: int, start: float, step: float
) -> dict[str, Callable[[], object]]:
    """The queries timed on a filled journal whose vm0 entries were recorded `step` apart."""
    last = j.entries("vm0", limit=1)[0]
    middle = last.id // 2
    return {
        "newest page (limit 100)": lambda: j.entries("vm0"),
        "page deep in history (before_id = middle)": lambda: j.entries("vm0", before_id=middle),
        "since 10 s ago": lambda: j.entries("vm0", since=last.recorded_at - 10),
        "since the beginning": lambda: j.entries("vm0", since=0),
        "since half-way, page at its end": lambda: j.entries(
            "vm0", since=start + middle * step, before_id=middle + 100 * vms
        ),
        "kinds that match nothing": lambda: j.entries("vm0", kinds={"request"}),
        "event_counts(vm) (when a VM is added)": lambda: j.event_counts("vm0"),
    }


def bench_reads(base: Path, size: int) -> tuple[dict[str, float], dict[str, float]]:
    """Query times on `size` entries: spread over VMS machines, and all in one VM (worst case)."""
    spread: dict[str, float] = {}
    single: dict[str, float] = {}
    step = 0.05
    start = time.time() - size * step
    for vms, out in ((VMS, spread), (1, single)):
        path = base / f"read{vms}.sqlite3"
        with Journal(path, max_events=size, prune_every=10**9) as j:
            prefill(j, size, vms=vms, start=start, step=step)
        begin = time.perf_counter()
        j = Journal(path, max_events=size)
        out["open (load counters, apply retention)"] = (time.perf_counter() - begin) * 1e3
        out["file size, MiB"] = path.stat().st_size / 2**20
        for label, fn in read_queries(j, vms, start, step).items():
            out[label] = time_query(fn)
        j.close()
        path.unlink()
    return spread, single


def report(
    args: argparse.Namespace,
    appends: dict[str, dict[str, float]],
    spread: dict[str, float],
    single: dict[str, float],
    fs: str,
    loads: tuple[str, str],
) -> str:
    lines = [
        "# Event journal benchmark",
        "",
        "Produced by `bench/bench_journal.py"
        + (" --quick" if args.quick else "")
        + f"` on {time.strftime('%Y-%m-%d')}. SQLite WAL, synchronous=NORMAL (no fsync per",
        "commit); one writer thread commits what was submitted in groups (up to 2,000 entries",
        "per transaction); reads on their own connection.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine().items()),
        f"- journal filesystem: {fs}",
        f"- load average (1, 5, 15 min) at start: {loads[0]}; at end: {loads[1]}"
        " (the machine is shared)",
        "",
        f"## Appends ({args.appends:,} timed appends, {VMS} VMs, BALLOON_CHANGE payload)",
        "",
        "| case | entries/s acknowledged | mean µs | p50 µs | p99 µs | p99.9 µs | max µs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in appends.items():
        cells = [f"{r[k]:.1f}" if k in r else "" for k in ("mean", "p50", "p99", "p99.9", "max")]
        lines.append(f"| {label} | {r['per_s']:,.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Reads ({args.entries:,} entries; milliseconds, best of 5, except the file size)",
        "",
        f"| query | {VMS} VMs | 1 VM (worst case) |",
        "|---|---:|---:|",
    ]
    for label in spread:
        lines.append(f"| {label} | {spread[label]:.2f} | {single[label]:.2f} |")
    lines += [
        "",
        "## Reading the numbers",
        "",
        "- `submit` is what the event loop pays per entry: encoding it and queueing it; the",
        "  commit, SQLite's WAL checkpoints (about every 1000 WAL pages, with an fsync) and",
        "  retention run on the writer thread, so its tail is the GIL and the scheduler, never",
        "  the disk. Entries/s acknowledged is submit to the last commit, as fast as submits",
        "  come: group commit at work.",
        "- `append` waits for its own commit: one transaction per entry plus the hand-over to",
        "  the writer thread and back; for blocking callers (tools, tests), not the daemon.",
        "- Reads: without `since` a page walks the VM's index newest first and stops at the",
        "  limit. With `since`, up to a few thousand matches are read from the time index; more",
        "  matches are newest, so the newest-first walk stops early. Paging to the end of a",
        "  large `since` window and a `kinds` filter that matches little scan the VM's",
        "  history: their cost grows with the VM's entry count (1 VM column).",
        "- `event_counts(vm)` is read once, when a VM is added; scrapes read the fleet's counts.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--dir", type=Path, help="where to put the journals (default: temp)")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("RESULTS-journal.md")
    )
    args = parser.parse_args()
    args.appends = 5_000 if args.quick else 50_000
    args.entries = 50_000 if args.quick else 1_000_000
    load_at_start = load_average()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="journal-bench-") as tmp:
        base = Path(tmp)
        fs = filesystem(base)
        appends = bench_appends(base, args.appends)
        spread, single = bench_reads(base, args.entries)
    text = report(args, appends, spread, single, fs, (load_at_start, load_average()))
    args.output.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
