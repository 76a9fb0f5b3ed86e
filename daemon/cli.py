"""The ``reclaimd`` command: serve, vms, demo, simulate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from api.version import VERSION
from daemon import logs
from daemon.config import DEFAULT_PORT, ConfigError, Settings, load_settings, parse_vm_flag
from daemon.model import cli as model_cli


def _serve(args: argparse.Namespace) -> int:
    try:
        vms = [parse_vm_flag(text) for text in args.vm]
        settings = load_settings(
            args.config,
            listen=args.listen,
            journal=args.journal,
            socket_glob=args.socket_glob,
            listen_socket=args.listen_socket,
            web_config=args.web_config,
            libvirt=args.libvirt,
            libvirt_nova_metadata=args.libvirt_nova_metadata,
            libvirt_qmp_passthrough=args.libvirt_qmp_passthrough,
            proxmox=args.proxmox,
            reclaim=args.reclaim,
        )
        if vms:
            settings = settings.model_copy(update={"vm": [*settings.vm, *vms]})
    except ConfigError as exc:
        print(f"reclaimd: {exc}", file=sys.stderr)
        return 2
    if not watches_something(settings):
        print(
            "reclaimd: nothing to watch: give --vm, --socket-glob, --listen-socket, --libvirt or "
            "--proxmox (or vm, socket_glob, listen_socket, libvirt or proxmox in the config file)",
            file=sys.stderr,
        )
        return 2
    from api.server import StartFailed, run  # the HTTP stack loads only for serving

    if settings.listen_host not in ("127.0.0.1", "localhost", "::1") and not settings.web_config:
        logging.getLogger("reclaimd").warning(
            "listening on %s: the API is reachable beyond this host, in plain HTTP and with no "
            "read authentication (see --web-config)",
            settings.listen,
        )
    try:
        return run(settings)
    except StartFailed as exc:
        line = start_failure(settings, exc.__cause__)
        if line is None:
            raise  # not what start-up is known to fail with: a bug, with its traceback
        print(f"reclaimd: {line}", file=sys.stderr)
        return 2


def start_failure(settings: Settings, exc: BaseException | None) -> str | None:
    """One line for what the daemon could not start with, from the error ``Reclaimd.start``
    raised: its journal (JournalError) or its listen socket (OSError); None for anything else."""
    from daemon.journal import JournalError

    if isinstance(exc, JournalError):
        path = str(settings.journal)
        reason = str(exc).removeprefix(f"journal {path}: ").removeprefix(f"journal {path} ")
        return f"journal {path}: {reason}"
    if isinstance(exc, OSError) and settings.listen_socket is not None:
        reason = exc.strerror or str(exc)
        if exc.filename is not None and str(exc.filename) != str(settings.listen_socket):
            reason = f"{exc.filename}: {reason}"  # the directory that could not be made
        return f"listen socket {settings.listen_socket}: {reason}"
    return None


def watches_something(settings: Settings) -> bool:
    """Whether the settings name any VM source: configured VMs, a socket glob, a listen socket,
    a libvirt URI or a Proxmox root."""
    return bool(
        settings.vm
        or settings.socket_glob
        or settings.listen_socket
        or settings.libvirt
        or settings.proxmox
    )


def _fmt_bytes(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _vms(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/api/v1/vms"
    body: dict[str, Any] = {"vms": []}
    after: str | None = ""
    try:
        while after is not None:  # every page: the list is paged by name
            query = "?" + urllib.parse.urlencode({"after": after}) if after else ""
            with urllib.request.urlopen(url + query, timeout=args.timeout) as reply:
                page = json.load(reply)
            body["vms"] += page.get("vms", [])
            after = page.get("next_after")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"reclaimd vms: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [("VM", "UP", "MODE", "STATE", "RAM", "BALLOON", "FREE", "AVAILABLE", "STATS AGE")]
    for vm in body.get("vms", []):
        age = vm.get("stats_age_seconds")
        rows.append(
            (
                str(vm.get("name")),
                "yes" if vm.get("up") else "no",
                str(vm.get("attach")),
                str(vm.get("session_state")),
                _fmt_bytes(vm.get("ram_bytes")),
                _fmt_bytes(vm.get("balloon_actual_bytes")),
                _fmt_bytes(vm.get("guest_free_bytes")),
                _fmt_bytes(vm.get("guest_available_bytes")),
                f"{age:.0f} s" if isinstance(age, int | float) else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if len(rows) == 1:
        print("(no VMs)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reclaimd",
        description="How much memory QEMU/KVM guests use, what the host got back, and what more "
        "it could get back.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"reclaimd {VERSION}")
    parser.add_argument(
        "--log-format", choices=logs.FORMATS, default="text", help="log lines as text or JSON"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="attach to VMs and serve REST and /metrics")
    serve.add_argument("--config", type=Path, help="TOML config file (also RECLAIMD_CONFIG)")
    serve.add_argument(
        "--vm",
        action="append",
        default=[],
        metavar="NAME=ADDRESS",
        help="a VM's QMP socket: unix:/path or tcp:host:port; prefix poll+ for a socket "
        "another manager uses (repeatable)",
    )
    serve.add_argument("--listen", help=f"HOST:PORT for the API (default 127.0.0.1:{DEFAULT_PORT})")
    serve.add_argument("--journal", type=Path, help="SQLite event journal path")
    serve.add_argument("--socket-glob", help="watched glob of QMP sockets (connect mode)")
    serve.add_argument("--listen-socket", type=Path, help="Unix socket QEMUs connect to")
    serve.add_argument(
        "--libvirt",
        nargs="?",
        const="qemu:///system",
        metavar="URI",
        help="attach every domain of a libvirt URI through libvirt's API (default URI "
        "qemu:///system; also RECLAIMD_LIBVIRT; needs reclaimd[libvirt])",
    )
    serve.add_argument(
        "--libvirt-nova-metadata",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="OpenStack Nova's metadata (instance name, flavor, project, user) as labels of "
        "qemu_vm_info (default off; also RECLAIMD_LIBVIRT_NOVA_METADATA)",
    )
    serve.add_argument(
        "--libvirt-qmp-passthrough",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also read what only QMP tells (RAM blocks, guest-physical addresses) through "
        "libvirt's qemu-monitor-command, which TAINTS every domain it is used on (default "
        "off; also RECLAIMD_LIBVIRT_QMP_PASSTHROUGH)",
    )
    serve.add_argument(
        "--proxmox",
        nargs="?",
        const=Path("/"),
        type=Path,
        metavar="ROOT",
        help="a Proxmox VE host's VMs, polled from ROOT/var/run/qemu-server (default ROOT /; "
        "also RECLAIMD_PROXMOX)",
    )
    serve.add_argument(
        "--web-config",
        type=Path,
        help="TLS and basic authentication for the API, in the web config format of "
        "Prometheus' exporters (also RECLAIMD_WEB_CONFIG)",
    )
    serve.add_argument(
        "--reclaim",
        choices=("advise", "act"),
        help="advise (default): advice and dry-run log lines only; act: move balloons",
    )
    serve.set_defaults(func=_serve)

    vms = sub.add_parser("vms", help="table of VMs from a running reclaimd")
    vms.add_argument(
        "--url",
        default=os.environ.get("RECLAIMD_URL", f"http://127.0.0.1:{DEFAULT_PORT}"),
        help="reclaimd's base URL (also RECLAIMD_URL)",
    )
    vms.add_argument("--json", action="store_true", help="raw JSON")
    vms.add_argument("--timeout", type=float, default=5.0)
    vms.set_defaults(func=_vms)

    model_cli.register(sub)
    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import importlib
    import importlib.util

    for module in ("daemon.demo",):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would blame the top-level command; the usage that helps is the sub-command's.
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    logs.configure(args.log_format, verbose=args.verbose)
    code: int = args.func(args)
    return code


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices.get(command, parser)
            return found
    return parser


if __name__ == "__main__":
    sys.exit(main())
