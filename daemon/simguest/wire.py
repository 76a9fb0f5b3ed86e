"""QMP on the wire: framing of the JSON stream, QEMU's error replies and the message shapes.

QEMU reads QMP as a stream of JSON values, not as lines: one line may hold several requests and
one request may span lines. ``JsonStream`` splits the byte stream the same way, by tracking
nesting outside strings, and hands each complete value to ``json.loads``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# QEMU's JSON lexer refuses tokens and nesting beyond these sizes (qobject/json-streamer.c).
MAX_VALUE_BYTES = 64 * 1024 * 1024
MAX_NESTING = 1024


class QMPError(Exception):
    """A QMP error reply: QEMU's error class and its human description."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def generic(desc: str) -> QMPError:
    return QMPError("GenericError", desc)


def command_not_found(name: str) -> QMPError:
    return QMPError("CommandNotFound", f"The command {name} has not been found")


@dataclass(frozen=True)
class ParseError:
    """A value in the stream that is not valid JSON; QEMU answers it with a GenericError."""

    desc: str


def encode(message: dict[str, Any]) -> bytes:
    """One QMP message as QEMU sends it: compact JSON and a CRLF."""
    return json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"


def error_reply(exc: QMPError, request_id: Any = None, *, has_id: bool = False) -> dict[str, Any]:
    # Key order as QEMU writes it: "id" leads an error reply and follows a return.
    reply: dict[str, Any] = {"id": request_id} if has_id else {}
    reply["error"] = {"class": exc.error_class, "desc": exc.desc}
    return reply


def return_reply(value: Any, request_id: Any = None, *, has_id: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"return": value}
    if has_id:
        reply["id"] = request_id
    return reply


def event_message(
    name: str, data: dict[str, Any] | None, now: float | None = None
) -> dict[str, Any]:
    """An event with QEMU's wall-clock timestamp split into seconds and microseconds."""
    stamp = time.time() if now is None else now
    seconds = int(stamp)
    message: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": int((stamp - seconds) * 1_000_000)},
        "event": name,
    }
    if data is not None:
        message["data"] = data
    return message


class JsonStream:
    """Splits a byte stream into JSON values the way QEMU's streamer does.

    ``feed`` returns the complete values found so far, each a decoded object or a ParseError.
    Bytes of an incomplete value stay buffered until more arrive.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scanned = 0
        self._start = -1

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        return list(self._values())

    def _values(self) -> Iterator[Any]:
        buf = self._buf
        i = self._scanned
        while i < len(buf):
            ch = buf[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == 0x5C:  # backslash
                    self._escape = True
                elif ch == 0x22:  # quote
                    self._in_string = False
                    if self._depth == 0:
                        yield self._take(i + 1)
                        buf, i = self._buf, 0
                        continue
                i += 1
                continue
            if self._start < 0:
                if ch in b" \t\r\n":
                    i += 1
                    continue
                self._start = i
            if ch == 0x22:
                self._in_string = True
            elif ch in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    yield self._reset_with("JSON parse error, nesting too deep")
                    buf, i = self._buf, 0
                    continue
            elif ch in b"}]":
                self._depth -= 1
                if self._depth <= 0:
                    yield self._take(i + 1)
                    buf, i = self._buf, 0
                    continue
            elif self._depth == 0 and ch in b" \t\r\n":
                # A bare scalar (number, keyword) ends at whitespace.
                yield self._take(i)
                buf, i = self._buf, 0
                continue
            i += 1
        self._scanned = i
        if len(buf) > MAX_VALUE_BYTES:
            yield self._reset_with("JSON parse error, token too large")

    def _take(self, end: int) -> Any:
        text = bytes(self._buf[self._start : end])
        del self._buf[:end]
        self._depth = 0
        self._in_string = self._escape = False
        self._scanned = 0
        self._start = -1
        try:
            return json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            return ParseError(_parse_error_desc(exc, text))

    def _reset_with(self, desc: str) -> ParseError:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = False
        self._scanned = 0
        self._start = -1
        return ParseError(desc)


def _parse_error_desc(exc: Exception, text: bytes) -> str:
    if isinstance(exc, json.JSONDecodeError):
        word = text[exc.pos :].split(maxsplit=1)
        if word and word[0][:1].isalpha():
            keyword = word[0].decode(errors="replace").rstrip("}],:")
            return f"JSON parse error, invalid keyword '{keyword}'"
        return f"JSON parse error, {exc.msg[0].lower()}{exc.msg[1:]}"
    return "JSON parse error, invalid UTF-8 sequence in string"
