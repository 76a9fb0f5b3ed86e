"""The reclaim estimate against simulated guests that know the truth, while memory moves.

One simulated guest per workload (memhog, fragment, pagecache, idle, churn) with its guest agent,
and the same workloads again without one (the split is then fitted only); ``reclaimd serve``
attached to all of them with the default 2 s polls and stats. Each guest's truth is read four
times a second; every 2 s each VM's estimate is compared with the truth of the window of its
inputs (one poll plus QEMU's whole-second stamps, ``--window``), and its error is the smallest
there (``daemon.simguest.accuracy``). Errors are fractions of RAM, p90 over all samples.

Targets: reported 2 %, free_resident 3 %, reportable 3 %, stranded 3 %, what-if at every order
3 %; without an agent reportable and stranded 6 %.

``--baseline REV`` runs the daemon of git revision REV against the same guests first (its
packages extracted to a temporary directory, as ``bench_fleet.py`` does), and prints both.

Usage: python bench/bench_estimate.py [--seconds 120] [--ram 256M] [--baseline REV]
Results: bench/RESULTS-estimate.md (``--results``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_fleet import Daemon, extract_revision
from machine import cpu_model  # bench/machine.py: scripts run from bench/

from daemon.model.cli import parse_size
from daemon.simguest.accuracy import (
    NO_AGENT_TOLERANCES,
    TOLERANCES,
    ErrorSeries,
    TruthReader,
    estimated,
)
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.launcher import GuestProcess

MiB = 1 << 20
RESULTS = Path(__file__).with_name("RESULTS-estimate.md")
WORKLOADS = ("memhog", "fragment", "pagecache", "idle", "churn")
POLL = 2.0
TRUTH_EVERY = 0.25


def start_guests(
    vms: Path, ram: int, logs: Path, workloads: tuple[str, ...] = WORKLOADS
) -> dict[str, GuestProcess]:
    guests: dict[str, GuestProcess] = {}
    for agent in (True, False):
        for i, workload in enumerate(WORKLOADS):
            if workload not in workloads:
                continue  # the seed stays the workload's, whichever run it is in
            name = workload if agent else f"{workload}-noagent"
            spec = SimGuestSpec(
                name=name,
                ram_bytes=ram,
                socket=vms / f"{name}.qmp",
                workload=workload,
                seed=i + 1,
                agent=agent,
            )
            guests[name] = GuestProcess.start(spec, log=logs / f"{name}.log")
    return guests


def sample(
    d: Daemon, guests: dict[str, GuestProcess], seconds: float, window: float
) -> dict[str, ErrorSeries]:
    """Truth four times a second (in a thread), estimates every poll, compared."""
    series = {
        name: ErrorSeries(NO_AGENT_TOLERANCES if name.endswith("-noagent") else TOLERANCES)
        for name in guests
    }
    readers = {name: guest.truth for name, guest in guests.items()}
    with TruthReader(readers, TRUTH_EVERY) as truths:
        time.sleep(window + 1)
        started = next_round = time.monotonic()
        while next_round - started < seconds:
            time.sleep(max(0.0, next_round - time.monotonic()))
            next_round += POLL
            fetched = []
            for name in guests:
                detail = d.client.get(f"/api/v1/vms/{name}").json()
                fetched.append((name, detail, time.time()))
            for name, detail, at in fetched:
                series[name].add(estimated(detail), truths.window(name, at - window, at))
    return series


def run(args: argparse.Namespace, workdir: Path, tree: Path | None) -> dict[str, ErrorSeries]:
    vms = workdir / "vms"
    vms.mkdir(exist_ok=True)
    # The daemon first, finding the guests as they appear: memory reported before it attached
    # looks, from the host, like memory never touched.
    d = Daemon(workdir, str(vms / "*.qmp"), workdir / f"reclaimd-{time.time_ns()}.log", tree)
    guests: dict[str, GuestProcess] = {}
    try:
        guests = start_guests(vms, args.ram, workdir, args.workloads)
        d.wait_up(len(guests), 60)
        time.sleep(10)  # first stats, first scans, first agent reads
        return sample(d, guests, args.seconds, args.window)
    finally:
        d.stop()
        for guest in guests.values():
            guest.stop()
        shutil.rmtree(vms, ignore_errors=True)


def markdown(runs: dict[str, dict[str, ErrorSeries]]) -> str:
    """One row per VM and component: p90 (max) per daemon, and the verdict of the last."""
    labels = list(runs)
    last = runs[labels[-1]]
    head = "| VM | component (limit) | " + " | ".join(f"{lab}: p90 / max" for lab in labels)
    lines = [head + " | verdict |", "|---|---|" + "---|" * len(labels) + "---|"]
    for name, series in last.items():
        for m in series.summary():
            cells = []
            for label in labels:
                other = {s.component: s for s in runs[label][name].summary()}.get(m.component)
                if other is None or other.p90 is None or other.max is None:
                    missing = other.missing if other is not None else "all"
                    cells.append(f"missing ({missing})")
                else:
                    extra = f", {other.missing} missing" if other.missing else ""
                    cells.append(f"{other.p90:.2%} / {other.max:.2%}{extra}")
            verdict = "within" if m.ok else "OUTSIDE"
            lines.append(
                f"| {name} | {m.component} ({m.tolerance:.0%}) | "
                + " | ".join(cells)
                + f" | {verdict} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="sampling window")
    parser.add_argument("--ram", type=parse_size, default=256 * MiB)
    parser.add_argument(
        "--workloads",
        type=lambda text: tuple(w for w in text.split(",") if w),
        default=WORKLOADS,
        help=f"comma-separated, of {','.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument(
        "--window", type=float, default=POLL + 1.0, help="how old inputs may be, seconds"
    )
    parser.add_argument("--baseline", metavar="REV", help="also run git revision REV's daemon")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if unknown := sorted(set(args.workloads) - set(WORKLOADS)):
        parser.error(f"unknown workloads: {', '.join(unknown)}")

    workdir = Path(tempfile.mkdtemp(prefix="rd-est-"))
    runs: dict[str, dict[str, ErrorSeries]] = {}
    try:
        if args.baseline:
            tree = extract_revision(args.baseline, workdir / "baseline")
            runs[f"baseline {args.baseline}"] = run(args, workdir, tree)
        runs["this tree"] = run(args, workdir, None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n".join(
        [
            "# The reclaim estimate against the truth, while memory moves",
            "",
            f"Command: `python bench/bench_estimate.py {' '.join(sys.argv[1:])}` "
            f"(run {time.strftime('%Y-%m-%d')})",
            "",
            f"- CPU: {cpu_model()}; {os.cpu_count()} cores; load average at the end {load}",
            f"- One simulated guest of {args.ram // MiB} MiB per workload, with its agent and "
            f"without (`-noagent`); polls and stats every {POLL:g} s; {args.seconds:g} s of "
            f"samples, each held against the truth of the {args.window:g} s before it.",
            "- Error = |estimate - truth| / RAM; `what_if` is the worst of orders 0..10.",
            "",
            markdown(runs),
            "",
        ]
    )
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
