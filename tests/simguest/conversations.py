"""QMP conversations held with real QEMU and with a simulated guest, and how to compare them.

Each conversation runs on a fresh connection. After every request the runner sends a sync
request with a unique id, so it collects exactly the replies (zero or more) that request caused
and the events that arrived meanwhile, without waiting on timeouts.

Comparison: error replies must match exactly (class and text); a ``return`` must match in shape
(same keys, same JSON types, recursively) unless the step asks for ``exact`` equality.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

RAM_BYTES = 256 << 20
VM_NAME = "simguest-diff"
VM_UUID = "6b5f1d2c-3f7e-4c3a-9d0e-2a1b3c4d5e6f"
BALLOON = "/machine/peripheral/balloon0"
BACKEND = f"{BALLOON}/virtio-backend"
FIXTURE = Path(__file__).parent / "fixtures" / "qemu-7.2.json"

# The QEMU command line the simulated guest imitates; -S keeps the guest from running.
QEMU_ARGS = [
    "-M",
    "pc,memory-backend=ram0",
    "-m",
    str(RAM_BYTES >> 20),
    "-object",
    f"memory-backend-memfd,id=ram0,size={RAM_BYTES >> 20}M",
    "-S",
    "-display",
    "none",
    "-nodefaults",
    "-name",
    VM_NAME,
    "-uuid",
    VM_UUID,
    "-device",
    "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
]

Compare = Literal["shape", "exact", "names"]


@dataclass(frozen=True)
class Step:
    request: Any  # a JSON value, or bytes sent as they are
    compare: Compare = "shape"
    pause: float = 0.0  # seconds to wait after the reply, collecting events


def cmd(name: str, compare: Compare = "shape", /, **arguments: Any) -> Step:
    request: dict[str, Any] = {"execute": name}
    if arguments:
        request["arguments"] = arguments
    return Step(request, compare)


def qom_get(path: str, prop: str, compare: Compare = "exact") -> Step:
    return cmd("qom-get", compare, path=path, property=prop)


def qom_set(path: str, prop: str, value: Any) -> Step:
    return cmd("qom-set", "exact", path=path, property=prop, value=value)


NEGOTIATE = cmd("qmp_capabilities", "exact")

CONVERSATIONS: dict[str, list[Step]] = {
    "negotiation": [
        cmd("query-status"),
        Step({"execute": "query-status", "id": 1}),
        cmd("no-such-command"),
        Step({"execute": "qmp_capabilities", "id": "a"}, "exact"),
        cmd("qmp_capabilities"),
        Step({"execute": "no-such-command", "id": 5}),
        Step({"execute": "query-status", "id": {"nested": [1, "x"]}}),
    ],
    "queries": [
        NEGOTIATE,
        cmd("query-version"),
        cmd("query-name", "exact"),
        cmd("query-uuid", "exact"),
        cmd("query-status"),
        cmd("query-balloon", "exact"),
        cmd("query-memory-size-summary", "exact"),
        cmd("query-memory-devices", "exact"),
        cmd("query-memdev", "exact"),
        cmd("x-query-ramblock", "exact"),
        cmd("qom-list", "exact", path="/machine/peripheral"),
        cmd("qom-list", "exact", path="/machine/peripheral-anon"),
        cmd("qom-list", "names", path=BALLOON),
        cmd("qom-list", "names", path=BACKEND),
        cmd("qom-list", "names", path="/objects"),
        cmd("qom-list", "names", path="/"),
        qom_get(BALLOON, "type"),
        qom_get(BALLOON, "free-page-reporting"),
        qom_get(BALLOON, "free-page-hint"),
        qom_get(BALLOON, "deflate-on-oom"),
        qom_get(BALLOON, "page-poison"),
        qom_get(BALLOON, "guest-stats-polling-interval"),
        qom_get(BALLOON, "guest-stats", "shape"),
        qom_get(BALLOON, "virtio-backend"),
        qom_get(BACKEND, "type"),
        qom_get(BACKEND, "guest-stats", "shape"),
        qom_get("balloon0", "deflate-on-oom"),
        qom_get("/objects/ram0", "size"),
        qom_get("/objects/ram0", "share"),
        qom_get("/machine/peripheral", "balloon0"),
    ],
    "argument-errors": [
        NEGOTIATE,
        cmd("query-status", "shape", x=1),
        cmd("query-balloon", "shape", x=1),
        cmd("balloon"),
        cmd("balloon", "shape", value="abc"),
        cmd("balloon", "shape", value=True),
        cmd("balloon", "shape", value=None),
        cmd("balloon", "shape", value=1000.0),
        cmd("balloon", "shape", value=0),
        cmd("balloon", "shape", value=-5),
        cmd("balloon", "shape", value=2**64 - 1),
        cmd("balloon", "shape", value=RAM_BYTES // 2, extra=1),
        cmd("balloon", "shape", extra=1, value="abc"),
        cmd("qom-get", "shape", path=BALLOON),
        cmd("qom-get", "shape", path=BALLOON, property=5),
        cmd("qom-get", "shape", path=BALLOON, property="guest-stats", x=1),
        cmd("qom-set", "shape", path=BALLOON, property="guest-stats-polling-interval"),
        cmd("qom-list"),
    ],
    "qom-errors": [
        NEGOTIATE,
        qom_get("/machine/peripheral/nope", "x"),
        qom_get(BALLOON, "nope"),
        qom_get(BACKEND, "nope"),
        qom_get("", "type"),
        qom_get("/objects/ram0", "nope"),
        cmd("qom-list", "shape", path="/nope"),
        qom_set(BALLOON, "guest-stats-polling-interval", -1),
        qom_set(BALLOON, "guest-stats-polling-interval", "x"),
        qom_set(BALLOON, "guest-stats-polling-interval", True),
        qom_set(BALLOON, "guest-stats-polling-interval", 1.5),
        qom_set(BALLOON, "guest-stats-polling-interval", 4294967296),
        qom_set(BALLOON, "guest-stats-polling-interval", 2**64 - 1),
        qom_set(BALLOON, "guest-stats", 0),
        qom_set(BALLOON, "free-page-reporting", False),
        qom_set(BALLOON, "deflate-on-oom", "x"),
        qom_set(BALLOON, "addr", 1),
        qom_set(BALLOON, "type", "x"),
        qom_set(BALLOON, "nope", False),
        qom_set(BACKEND, "free-page-reporting", False),
        qom_set(BACKEND, "guest-stats", 0),
    ],
    "request-errors": [
        NEGOTIATE,
        Step(b"[1]\n"),
        Step(b'"x"\n'),
        Step({"execute": 5}),
        Step({"id": 9}),
        Step({"execute": "query-status", "arguments": []}),
        Step({"execute": "query-status", "foo": 1}),
        Step({"exec-oob": "query-status"}),
        Step({"execute": "query-status", "exec-oob": "query-status"}),
    ],
    "balloon-and-stats": [
        NEGOTIATE,
        Step({"execute": "balloon", "arguments": {"value": RAM_BYTES // 2}, "id": 7}, "exact"),
        cmd("balloon", "exact", value=RAM_BYTES * 4),
        qom_set(BALLOON, "guest-stats-polling-interval", 2),
        qom_get(BALLOON, "guest-stats-polling-interval"),
        qom_get(BACKEND, "guest-stats-polling-interval"),
        qom_set(BALLOON, "guest-stats-polling-interval", 5),
        qom_get(BALLOON, "guest-stats-polling-interval"),
        qom_set(BALLOON, "guest-stats-polling-interval", 0),
        qom_get(BALLOON, "guest-stats-polling-interval"),
    ],
    "oob": [
        cmd("qmp_capabilities", "exact", enable=["nope"]),
        cmd("qmp_capabilities", "exact", enable="oob"),
        cmd("qmp_capabilities", "exact", enable=["oob"]),
        Step({"exec-oob": "query-status", "id": 1}),
        Step({"exec-oob": "no-such-command", "id": 2}),
        Step({"exec-oob": 5, "id": 3}),
    ],
    "lifecycle": [
        NEGOTIATE,
        cmd("stop", "exact"),
        cmd("stop", "exact"),
        cmd("query-status", "exact"),
        cmd("cont", "exact"),
        cmd("query-status", "exact"),
        cmd("stop", "exact"),
    ],
}


@dataclass
class Transcript:
    greeting: Any
    replies: list[list[Any]]  # per step, the replies it caused
    events: list[list[str]]  # per step, names of the events seen before its sync reply
    messages: list[list[dict[str, Any]]] | None = None  # the events themselves (not stored)

    def to_json(self) -> dict[str, Any]:
        return {"greeting": self.greeting, "replies": self.replies, "events": self.events}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Transcript:
        return cls(doc["greeting"], doc["replies"], doc["events"])


async def converse(path: str, steps: list[Step], timeout: float = 10.0) -> Transcript:
    """Hold one conversation on a fresh connection to the QMP socket at ``path``."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            greeting = json.loads(await reader.readline())
            replies: list[list[Any]] = []
            messages: list[list[dict[str, Any]]] = []
            for i, step in enumerate(steps):
                raw = step.request
                writer.write(raw if isinstance(raw, bytes) else json.dumps(raw).encode() + b"\n")
                got: list[Any] = []
                seen: list[dict[str, Any]] = []
                await _sync(reader, writer, f"sync-{i}", got, seen)
                if step.pause:
                    await asyncio.sleep(step.pause)
                    await _sync(reader, writer, f"sync-{i}-pause", got, seen)
                replies.append(got)
                messages.append(seen)
            events = [[m["event"] for m in seen] for seen in messages]
            return Transcript(greeting, replies, events, messages)
        finally:
            writer.close()
            await writer.wait_closed()


async def _sync(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    sync_id: str,
    replies: list[Any],
    events: list[dict[str, Any]],
) -> None:
    """Send a marker request and sort everything before its reply into replies and events."""
    # query-version exists before and after negotiation (as an error or a reply).
    writer.write(json.dumps({"execute": "query-version", "id": sync_id}).encode() + b"\n")
    await writer.drain()
    while True:
        line = await reader.readline()
        if not line:
            raise EOFError(f"connection closed before {sync_id}")
        msg = json.loads(line)
        if isinstance(msg, dict) and "event" in msg:
            events.append(msg)
        elif isinstance(msg, dict) and msg.get("id") == sync_id:
            return
        else:
            replies.append(msg)


def shape(value: Any) -> Any:
    """The JSON type structure of a value: keys kept, scalars replaced by their type name."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        kinds = []
        for item in value:
            s = shape(item)
            if s not in kinds:
                kinds.append(s)
        return ["list", sorted(kinds, key=json.dumps)]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if value is None:
        return "null"
    return type(value).__name__


def differences(expected: Transcript, actual: Transcript, steps: list[Step]) -> list[str]:
    """Human-readable differences between two transcripts of the same conversation."""
    diffs = []
    if shape(expected.greeting) != shape(actual.greeting):
        diffs.append(f"greeting: {expected.greeting} vs {actual.greeting}")
    for i, step in enumerate(steps):
        want, got = expected.replies[i], actual.replies[i]
        where = f"step {i} {step.request!r}"
        if len(want) != len(got):
            diffs.append(f"{where}: {len(want)} replies vs {len(got)}: {want} vs {got}")
            continue
        for w, g in zip(want, got, strict=True):
            if not _same_reply(w, g, step.compare):
                diffs.append(f"{where}:\n  QEMU: {w}\n  sim:  {g}")
        if expected.events[i] != actual.events[i]:
            diffs.append(f"{where}: events {expected.events[i]} vs {actual.events[i]}")
    return diffs


def _same_reply(want: Any, got: Any, compare: Compare) -> bool:
    if not isinstance(want, dict) or not isinstance(got, dict):
        return bool(want == got)
    if set(want) != set(got) or want.get("id") != got.get("id"):
        return False
    if "error" in want:
        return bool(want["error"] == got["error"])
    if compare == "exact":
        return bool(want["return"] == got["return"])
    if compare == "names":
        return {e["name"]: e["type"] for e in want["return"]} == {
            e["name"]: e["type"] for e in got["return"]
        }
    return bool(shape(want["return"]) == shape(got["return"]))
