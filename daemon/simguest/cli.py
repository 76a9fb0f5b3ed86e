"""``python -m daemon.simguest``: run one simulated guest, or a fleet of them.

    python -m daemon.simguest run --name web1 --ram 512M --socket /tmp/web1.qmp --workload memhog
    python -m daemon.simguest fleet --count 500 --dir /tmp/fleet --ram 64M

``run`` serves QMP on ``--socket`` (like ``-qmp unix:PATH,server=on,wait=off``) and/or connects
out to ``--connect`` (like ``-chardev socket,path=PATH,reconnect=N``). ``fleet`` starts
``--count`` guests named PREFIX000, PREFIX001, ... with sockets ``DIR/NAME.qmp``, cycling through
``--workloads``. Each guest's ground truth is served on ``SOCKET.truth`` (see ``truth.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.model.cli import parse_size
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.process import default_guest_os, run_fleet, run_guest


def _guest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ram", type=parse_size, default=256 << 20, help="guest RAM (256M)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload")
    parser.add_argument("--engine", default="upstream", help="free page reporting engine")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="guest seconds per host second"
    )
    parser.add_argument("--tick", type=float, default=0.1, help="step interval, seconds")
    parser.add_argument(
        "--no-free-page-reporting", action="store_true", help="free-page-reporting=off"
    )
    parser.add_argument("--deflate-on-oom", action="store_true", help="deflate-on-oom=on")
    parser.add_argument(
        "--page-reporting-order", type=int, help="the guest's page_reporting_order (9)"
    )
    parser.add_argument("--no-agent", action="store_true", help="no guest agent (SOCKET.qga)")
    parser.add_argument(
        "--agent-block-rpcs", default="", help="agent commands to block, comma-separated"
    )
    parser.add_argument(
        "--no-guest-os", action="store_true", help="the guest never loads a balloon driver"
    )
    parser.add_argument("--ready-fd", type=int, help="write 'ready ...' on this fd when up")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m daemon.simguest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one simulated guest in this process")
    run.add_argument("--name", required=True)
    run.add_argument("--socket", type=Path, help="QMP server socket path")
    run.add_argument("--connect", type=Path, help="socket of a manager to connect out to")
    run.add_argument("--reconnect", type=float, default=5.0, help="seconds between attempts")
    run.add_argument("--workload", default="idle")
    run.add_argument("--uuid")
    run.add_argument("-S", dest="paused", action="store_true", help="wait for 'cont' (prelaunch)")
    _guest_options(run)
    fleet = sub.add_parser("fleet", help="many guests, one forked process each")
    fleet.add_argument("--count", type=int, required=True)
    fleet.add_argument("--dir", type=Path, required=True, help="directory for the sockets")
    fleet.add_argument("--prefix", default="sim")
    fleet.add_argument("--workloads", default="idle", help="comma-separated, used in turn")
    fleet.add_argument(
        "--sched-idle",
        action="store_true",
        help="run the guests under SCHED_IDLE, so they only use CPU nothing else wants "
        "(benchmarks of the daemon on a small machine)",
    )
    _guest_options(fleet)
    return parser


def _spec(args: argparse.Namespace, **fields: Any) -> SimGuestSpec:
    return SimGuestSpec(
        ram_bytes=args.ram,
        engine=args.engine,
        time_scale=args.time_scale,
        tick=args.tick,
        free_page_reporting=not args.no_free_page_reporting,
        deflate_on_oom=args.deflate_on_oom,
        page_reporting_order=args.page_reporting_order,
        agent=not args.no_agent,
        agent_block_rpcs=tuple(c for c in args.agent_block_rpcs.split(",") if c),
        **fields,
    )


def run_spec(args: argparse.Namespace) -> SimGuestSpec:
    if args.socket is None and args.connect is None:
        raise SystemExit("simguest run: give --socket, --connect or both")
    return _spec(
        args,
        name=args.name,
        socket=args.socket,
        connect=args.connect,
        reconnect=args.reconnect,
        workload=args.workload,
        seed=args.seed,
        uuid=args.uuid,
        start_paused=args.paused,
    )


def fleet_specs(args: argparse.Namespace) -> list[SimGuestSpec]:
    workloads = [w for w in args.workloads.split(",") if w]
    if args.count < 1 or not workloads:
        raise SystemExit("simguest fleet: need --count >= 1 and at least one workload")
    width = max(3, len(str(args.count - 1)))
    specs = []
    for i in range(args.count):
        name = f"{args.prefix}{i:0{width}d}"
        specs.append(
            _spec(
                args,
                name=name,
                socket=args.dir / f"{name}.qmp",
                workload=workloads[i % len(workloads)],
                seed=args.seed + i,
            )
        )
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    guest_os = None if args.no_guest_os else default_guest_os()
    if args.command == "run":
        return run_guest(run_spec(args), guest_os, args.ready_fd)
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.sched_idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    return run_fleet(fleet_specs(args), guest_os, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
