"""``reclaimd simulate``: run reporting engines side by side on one workload.

Example::

    reclaimd simulate --ram 4GiB --engine upstream,boundary,naive --workload memhog \\
        --seconds 120 --plot sim.png

prints one row per engine; ``--json`` prints the full results for scripts instead; ``--plot``
writes ``sim.png`` (memory returned over time) and ``sim-scaling.png`` (cost per reported page
against guest size, log-log, from extra runs at the sizes in ``--sizes``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .constants import PAGE_SIZE
from .costs import OpCosts
from .engines import ENGINES
from .overhead import overhead
from .simulation import SimConfig, Simulation
from .workloads import WORKLOADS, PageFault, make_workload

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4GiB``, ``512M``, ``1g``, ``4096`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB or 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate a guest's allocator and compare free page reporting designs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ram", type=parse_size, default=parse_size("4GiB"), help="guest RAM")
    p.add_argument(
        "--engine",
        default="upstream",
        help=f"comma-separated reporting engines: {', '.join(ENGINES)}",
    )
    p.add_argument(
        "--workload", default="memhog", choices=[*WORKLOADS, "trace"], help="workload to run"
    )
    p.add_argument("--trace", help="trace file for --workload trace (see docs/model.md)")
    p.add_argument("--seconds", type=float, default=120.0, help="simulated seconds")
    p.add_argument("--order", type=int, default=9, help="page_reporting_order")
    p.add_argument("--cpus", type=int, default=2, help="guest CPUs (per-CPU lists)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print full results as JSON")
    p.add_argument(
        "--costs",
        metavar="FILE.json",
        type=Path,
        help="per-operation costs (bench/op_costs.json): time the passes; for page_fault, "
        "add the throughput change each design causes",
    )
    p.add_argument("--plot", metavar="FILE.png", help="write PNG plots")
    p.add_argument(
        "--sizes",
        help="guest sizes for the scaling plot (default: RAM/16, RAM/4, RAM)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def _progress(label: str, enabled: bool) -> Callable[[float], None]:
    def show(fraction: float) -> None:
        if not enabled:
            return
        width = 30
        done = int(fraction * width)
        sys.stderr.write(f"\r{label:<24} [{'#' * done}{' ' * (width - done)}] {fraction:4.0%}")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def simulate_one(args: argparse.Namespace, engine: str, ram: int, label: str) -> dict[str, Any]:
    costs = OpCosts.from_json(args.costs) if args.costs else None
    config = SimConfig(
        ram_bytes=ram,
        engine=engine,
        order=args.order,
        ncpus=args.cpus,
        seed=args.seed,
        costs=costs,
    )
    started = time.perf_counter()
    workload = make_workload(args.workload, args.trace)
    sim = Simulation(config, workload)
    sim.run(args.seconds, _progress(label, not args.no_progress and sys.stderr.isatty()))
    result = sim.result()
    if costs is not None and isinstance(workload, PageFault):
        result["overhead"] = overhead(sim, costs, workload.tasks * args.seconds).as_dict()
    result["wall_seconds"] = round(time.perf_counter() - started, 3)
    result["workload"] = args.workload
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    header = (
        "engine",
        "returned MiB",
        "pages rep.",
        "reports",
        "visited",
        "visit/page",
        "locks",
        "hints lost",
        "realloc<host",
        "re-reported",
        "refault MiB",
    )
    rows = [header]
    for r in results:
        c = r["costs"]
        h = r["host"]
        vpp = r["visited_per_reported_page"]
        rows.append(
            (
                r["engine"],
                f"{r['reported_bytes_now'] / 2**20:.0f}",
                str(c["pages_reported"]),
                str(c["reports"]),
                str(c["visited"]),
                f"{vpp:.4f}" if vpp is not None else "-",
                str(c["lock_acquisitions"]),
                str(c["hints_lost"]),
                str(c["reallocated_before_host"]),
                str(h["blocks_reported_again"]),
                f"{h['refaults'] * PAGE_SIZE / 2**20:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        print(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    if args.workload == "trace" and not args.trace:
        print("--workload trace needs --trace FILE", file=sys.stderr)
        return 2
    if args.costs:
        try:
            OpCosts.from_json(args.costs)
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"--costs {args.costs}: {err}", file=sys.stderr)
            return 2
    results = [simulate_one(args, e, args.ram, e) for e in engines]
    output: dict[str, Any] = {
        "ram_bytes": args.ram,
        "workload": args.workload,
        "seconds": args.seconds,
        "order": args.order,
        "seed": args.seed,
        "results": results,
    }
    if args.plot:
        from .plot import plot_returned, plot_scaling

        path = Path(args.plot)
        plot_returned(results, str(path), f"{args.workload}, {args.ram / 2**30:g} GiB guest")
        sizes = (
            [parse_size(s) for s in args.sizes.split(",")]
            if args.sizes
            else [args.ram // 16, args.ram // 4, args.ram]
        )
        points: dict[str, list[tuple[float, float]]] = {e: [] for e in engines}
        for size in sorted(set(sizes)):
            for r in results if size == args.ram else []:
                points[r["engine"]].append((size / 2**30, r["visited_per_reported_page"] or 0))
            if size == args.ram:
                continue
            for e in engines:
                r = simulate_one(args, e, size, f"{e} {size / 2**30:g}GiB")
                points[e].append((size / 2**30, r["visited_per_reported_page"] or 0))
        scaling = path.with_name(path.stem + "-scaling" + (path.suffix or ".png"))
        plot_scaling(points, str(scaling), f"{args.workload}, order {args.order}")
        output["plots"] = [str(path), str(scaling)]
        output["scaling"] = points
    if args.json:
        for r in output["results"]:
            r["series"] = [list(s) for s in r["series"]]
        json.dump(output, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(results))
        for p in output.get("plots", []):
            print(f"wrote {p}")
    return 0
