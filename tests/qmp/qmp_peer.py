"""A QEMU-like QMP peer in its own process, for listen-mode tests: it connects out to a manager's
socket as ``-chardev socket,path=PATH,reconnect=N -mon chardev=...,mode=control`` does, greets,
and answers what reclaimd asks at attach (no balloon device). Standard library only, so it runs
as any user.

    python tests/qmp/qmp_peer.py --connect PATH --name NAME [--uuid U] [--reconnect S]

It prints one line per connection: ``connected``, then ``closed`` when the manager hangs up
(at once, for a refused peer), so a test can follow it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

MiB = 1 << 20


def _reply(msg: dict[str, object], name: str, uuid: str) -> dict[str, object]:
    command = msg.get("execute")
    answers: dict[object, object] = {
        "qmp_capabilities": {},
        "query-name": {"name": name},
        "query-uuid": {"UUID": uuid},
        "query-status": {"status": "running", "singlestep": False, "running": True},
        "query-memory-size-summary": {"base-memory": 256 * MiB, "plugged-memory": 0},
        "balloon": {},
    }
    if command in answers:
        reply: dict[str, object] = {"return": answers[command]}
    else:
        desc = f"The command {command} has not been found"
        reply = {"error": {"class": "CommandNotFound", "desc": desc}}
    if "id" in msg:
        reply["id"] = msg["id"]
    return reply


def serve(path: str, name: str, uuid: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        print(f"refused {exc.strerror}", flush=True)
        sock.close()
        return
    print("connected", flush=True)
    greeting = {"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0}, "package": ""},
                        "capabilities": []}}  # fmt: skip
    try:
        sock.sendall(json.dumps(greeting).encode() + b"\r\n")
        decoder, buffer = json.JSONDecoder(), ""
        while chunk := sock.recv(65536):
            buffer += chunk.decode()
            while buffer.strip():
                try:
                    msg, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break
                buffer = buffer.lstrip()[end:]
                sock.sendall(json.dumps(_reply(msg, name, uuid)).encode() + b"\r\n")
    except OSError:
        pass
    finally:
        sock.close()
        print("closed", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connect", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--uuid", default="00000000-0000-0000-0000-000000000000")
    parser.add_argument("--reconnect", type=float, default=0.0, help="0: connect once")
    args = parser.parse_args()
    while True:
        serve(args.connect, args.name, args.uuid)
        if args.reconnect <= 0:
            return 0
        time.sleep(args.reconnect)


if __name__ == "__main__":
    sys.exit(main())
