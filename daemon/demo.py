"""``reclaimd demo``: the whole product on one machine, with no VMs needed.

Starts simulated guests with varied workloads (and, with ``--qemu``, real QEMU test guests),
then the daemon and its API on localhost attached to all of them through a watched socket
glob. Prints the URLs, a bearer token for balloon changes and a live summary; Ctrl-C stops
everything: the API, every guest process, and the temporary directory with sockets and journal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from daemon.config import DEFAULT_PORT, ConfigError, Settings, load_settings
from daemon.model.cli import parse_size
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.launcher import GuestProcess, LaunchError

WORKLOADS = ("memhog", "fragment", "pagecache", "idle")
MiB = 1 << 20
# The real test guest: allocate and free in rounds, so reporting has something to return.
QEMU_WORKLOAD = "alloc:160,hold:20,free,hold:40,repeat"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reclaimd demo`` to the CLI."""
    p = subparsers.add_parser(
        "demo",
        help="simulated guests plus the daemon and API on localhost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--guests", type=int, default=4, help="simulated guests (4)")
    p.add_argument("--ram", type=parse_size, default=512 * MiB, help="RAM per guest (512M)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, used in turn")
    p.add_argument(
        "--time-scale",
        type=float,
        default=4.0,
        help="guest seconds per real second, so workloads and reporting show sooner (4)",
    )
    p.add_argument("--qemu", action="store_true", help="also boot real QEMU test guests")
    p.add_argument("--qemu-guests", type=int, default=1, help="with --qemu: how many (1)")
    p.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", help="API HOST:PORT")
    p.add_argument("--summary-every", type=float, default=5.0, help="seconds; 0 turns it off")
    p.add_argument("--dir", type=Path, help="keep sockets, logs and journal here")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.guests < 0 or (args.guests == 0 and not args.qemu):
        print("reclaimd demo: need at least one guest", file=sys.stderr)
        return 2
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="reclaimd-demo-"))
    vms = workdir / "vms"
    vms.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    # SIGTERM ends the demo as Ctrl-C does: everything stopped, its directory removed. (uvicorn
    # takes the signal while it serves and raises it again once shut down: it lands here.)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings = load_settings(
            None,
            listen=args.listen,
            journal=workdir / "journal.sqlite3",
            socket_glob=str(vms / "*.qmp"),
            token=token,
        )
    except ConfigError as exc:
        print(f"reclaimd demo: {exc}", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            workloads = [w for w in args.workloads.split(",") if w] or list(WORKLOADS)
            for i in range(args.guests):
                name = f"sim-{workloads[i % len(workloads)]}-{i + 1}"
                spec = SimGuestSpec(
                    name=name,
                    ram_bytes=args.ram,
                    socket=vms / f"{name}.qmp",  # the daemon names a VM after its socket
                    workload=workloads[i % len(workloads)],
                    seed=i + 1,
                    time_scale=args.time_scale,
                )
                log = workdir / f"{spec.name}.log"
                stack.enter_context(GuestProcess.start(spec, log=log))
                print(f"  started {spec.name} ({args.ram // MiB} MiB, {spec.workload})")
            if args.qemu:
                for closer in _start_qemu_guests(args.qemu_guests, workdir, vms):
                    stack.callback(closer)
            _banner(settings, token, workdir)
            stop_summary = threading.Event()
            if args.summary_every > 0:
                base = f"http://{_url_host(settings)}:{settings.listen_port}"
                thread = threading.Thread(
                    target=_summaries,
                    args=(base, args.summary_every, stop_summary),
                    name="demo-summary",
                    daemon=True,
                )
                thread.start()
            stack.callback(stop_summary.set)
            from api.server import run  # the HTTP stack loads only when it is needed

            return run(settings)
    except LaunchError as exc:
        print(f"reclaimd demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how the demo is meant to end
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        print("reclaimd demo: stopped", file=sys.stderr)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _start_qemu_guests(count: int, workdir: Path, vms: Path) -> Iterator[Callable[[], None]]:
    from daemon.testguest import GuestBuildError, GuestError, QemuGuestSpec, build_image, launch

    try:
        image = build_image()
    except GuestBuildError as exc:
        raise LaunchError(f"cannot build the QEMU test guest: {exc}") from exc
    for i in range(count):
        spec = QemuGuestSpec(
            name=f"qemu-{i + 1}",
            ram_bytes=512 * MiB,
            memfd=True,
            workload=QEMU_WORKLOAD,
            qmp="server",
            qmp_path=vms / f"qemu-{i + 1}.qmp",
        )
        try:
            guest = launch(spec, image, workdir / spec.name)
        except GuestError as exc:
            raise LaunchError(f"cannot start QEMU guest {spec.name}: {exc}") from exc
        print(f"  started {spec.name} (QEMU, 512 MiB, {guest.accel.name}; boots in ~15 s)")
        yield guest.close


def _url_host(settings: Settings) -> str:
    host = settings.listen_host
    return f"[{host}]" if ":" in host else host


def _banner(settings: Settings, token: str, workdir: Path) -> None:
    base = f"http://{_url_host(settings)}:{settings.listen_port}"
    print(
        f"""
reclaimd demo
  status     {base}/
  API        {base}/api/v1/vms
  docs       {base}/docs
  metrics    {base}/metrics
  vms        reclaimd vms --url {base}
  balloon    curl -X POST -H 'Authorization: Bearer {token}' \\
               -H 'Content-Type: application/json' -d '{{"target_bytes": 268435456}}' \\
               {base}/api/v1/vms/NAME/balloon
  files      {workdir}
Ctrl-C (or SIGTERM) stops everything.
""",
        flush=True,
    )


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2.0) as reply:
        return json.load(reply)


def _summaries(base: str, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            vms = _get(f"{base}/api/v1/vms").get("vms", [])
            details = [_get(f"{base}/api/v1/vms/{vm['name']}") for vm in vms]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            continue  # the API is starting or stopping
        print(summary_table(details), flush=True)


def _mib(value: Any) -> str:
    return f"{value / MiB:.0f}" if isinstance(value, int | float) else "-"


def _estimate(detail: dict[str, Any], name: str) -> Any:
    estimate = detail.get("estimate") or {}
    value = (estimate.get("components") or {}).get(name)
    return value.get("bytes") if isinstance(value, dict) else value


def summary_table(details: list[dict[str, Any]]) -> str:
    """One line per VM, sizes in MiB; ``-`` where reclaimd does not know the number."""
    # HOST first among the sizes: what each VM really costs the host (resident guest RAM).
    head = ("VM", "UP", "RAM", "HOST", "BALLOON", "FREE", "AVAIL", "REPORTED", "RECLAIMABLE")
    rows = [head]
    for d in sorted(details, key=lambda d: str(d.get("name"))):
        rows.append(
            (
                str(d.get("name")),
                "yes" if d.get("up") else "no",
                _mib(d.get("ram_bytes")),
                _mib(d.get("host_resident_bytes")),
                _mib(d.get("balloon_actual_bytes")),
                _mib(d.get("guest_free_bytes")),
                _mib(d.get("guest_available_bytes")),
                _mib(_estimate(d, "reported")),
                _mib(_estimate(d, "reclaimable")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n" + "\n".join(lines) + "\n(MiB)"
