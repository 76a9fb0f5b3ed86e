"""``python -m daemon.testguest build|run``: build the test guest image, or boot it by hand."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from daemon.testguest.build import build_image, default_cache_dir
from daemon.testguest.errors import GuestError
from daemon.testguest.launch import QemuGuestSpec, launch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m daemon.testguest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_image_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--cache", type=Path, help=f"cache directory (default {default_cache_dir()})"
        )
        p.add_argument("--kernel-package", help="pin a linux-image-* package")

    build = sub.add_parser(
        "build", help="build the image (or find it in the cache); print its path"
    )
    add_image_options(build)
    build.add_argument("--rebuild", action="store_true", help="build even if cached")

    run = sub.add_parser("run", help="boot the guest; Ctrl-C stops it")
    add_image_options(run)
    run.add_argument("--name", default="testguest")
    run.add_argument("--ram", type=int, default=512, metavar="MIB")
    run.add_argument("--workload", help="e.g. alloc:200,hold:5,free,sleep:5,repeat")
    run.add_argument("--memfd", action="store_true", help="memory-backend-memfd guest RAM")
    run.add_argument("--no-reporting", action="store_true", help="free-page-reporting=off")
    run.add_argument("--no-balloon-device", action="store_true")
    run.add_argument("--no-balloon-id", action="store_true", help="balloon device without an id")
    run.add_argument("--noballoon", action="store_true", help="guest does not load the driver")
    run.add_argument("--order", type=int, help="page_reporting.page_reporting_order")
    run.add_argument(
        "--no-agent-device", action="store_true", help="no virtio-serial port for the guest agent"
    )
    run.add_argument("--noagent", action="store_true", help="guest does not start qemu-ga")
    run.add_argument(
        "--agent-block",
        metavar="RPCS",
        help="qemu-ga --block-rpcs, e.g. guest-file-open,guest-file-read",
    )
    qmp = run.add_mutually_exclusive_group()
    qmp.add_argument("--qmp", type=Path, help="QMP server socket QEMU listens on")
    qmp.add_argument("--qmp-connect", type=Path, help="socket of a listening daemon to connect to")
    run.add_argument("--accel", choices=("tcg", "kvm", "auto"))
    run.add_argument("--run-dir", type=Path, help="keep console and QEMU logs here")
    run.add_argument("extra", nargs="*", help="extra QEMU arguments (after --)")
    return parser


def _run(args: argparse.Namespace) -> int:
    image = build_image(args.cache, kernel_package=args.kernel_package)
    spec = QemuGuestSpec(
        name=args.name,
        ram_bytes=args.ram << 20,
        workload=args.workload,
        memfd=args.memfd,
        free_page_reporting=not args.no_reporting,
        balloon=not args.no_balloon_device,
        balloon_id=None if args.no_balloon_id else "balloon0",
        noballoon=args.noballoon,
        page_reporting_order=args.order,
        agent=not args.no_agent_device,
        noagent=args.noagent,
        agent_block_rpcs=tuple(args.agent_block.split(",")) if args.agent_block else (),
        qmp="client" if args.qmp_connect else "server",
        qmp_path=args.qmp_connect or args.qmp,
        accel=args.accel,
        extra_args=tuple(args.extra),
    )
    with launch(spec, image, args.run_dir) as guest:
        print(f"pid        {guest.pid}  ({guest.accel.reason})")
        print(f"qmp        {spec.qmp} {guest.qmp_path}")
        print(f"control    {guest.control_path}  (e.g. socat - UNIX-CONNECT:PATH)")
        print(f"agent      {guest.agent_path or 'none'}")
        print(f"console    {guest.console_log}")
        guest.wait_for_console(r"^RECLAIMD-GUEST: ready", timeout=180)
        print("guest ready; Ctrl-C stops it", flush=True)
        try:
            while guest.returncode is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        print(f"QEMU exited with {guest.terminate()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            image = build_image(
                args.cache, kernel_package=args.kernel_package, rebuild=args.rebuild
            )
            print(image.directory)
            return 0
        return _run(args)
    except GuestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
