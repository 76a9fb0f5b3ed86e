"""What a VM sends, made safe to keep, serve and store: cleaned and bounded where it enters.

Everything QEMU says, and the guest through it, is untrusted. JSON lets a peer send text that is
not valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``), integers of hundreds of digits,
NaN and infinities (Python's ``json`` accepts both), nesting hundreds of levels deep and objects
of any size. Kept as they came, one such value breaks whatever reads it later, for every VM at
once: the UTF-8 encoding of a REST response or a scrape, the float of a sample value, the JSON of
a journal entry, a recursion. So ``daemon.qmp`` passes every value through these helpers as it
arrives, and what serves or stores values (the fleet's ``last_error``, the journal, the
exposition) applies them again as a last line.

- :func:`clean_text` / :func:`one_line`: valid Unicode of bounded length (``one_line`` also for
  text shown on one line: no control characters, no bidirectional overrides).
- :func:`bounded_int`: an integer in a range, else None (never a bool).
- :func:`clean_json`: a bounded, JSON-safe copy of any decoded JSON value.
- :func:`describe`: a short, safe description of a value for a problem message.
- :func:`vm_name`: a VM name from what a peer or a file name says.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "MAX_INT",
    "MAX_TEXT",
    "bad_size",
    "bounded_int",
    "clean_json",
    "clean_text",
    "describe",
    "one_line",
    "text_or_none",
    "type_name",
    "vm_name",
]

#: The largest size or count reclaimd keeps from a VM: nothing real comes near 2^63.
MAX_INT: Final = 2**63 - 1
#: Default bound of a text value, in characters.
MAX_TEXT: Final = 4096
#: Bounds of :func:`clean_json`: nesting levels, members per object or array, values in all.
MAX_DEPTH: Final = 8
MAX_ITEMS: Final = 256
MAX_NODES: Final = 4096

REPLACEMENT: Final = "\ufffd"
ELLIPSIS: Final = "…"
# Python strings can hold any code point, but UTF-8 (hence JSON over HTTP, SQLite text and the
# Prometheus text format) cannot encode the surrogates: only they need replacing.
_SURROGATES: Final = re.compile("[\ud800-\udfff]")
# On one line: C0 and C1 controls and DEL, and the bidirectional controls that make text read
# differently from what it is (line breaks and tabs become spaces first).
_UNPRINTABLE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_WHITESPACE: Final = re.compile(r"[\t\n\r\v\f]+")
_NOT_NAME: Final = re.compile(r"[^A-Za-z0-9_.:@-]")
ZERO_UUID: Final = "00000000-0000-0000-0000-000000000000"
MAX_VM_NAME: Final = 128


def clean_text(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` as valid Unicode of at most ``limit`` characters.

    What UTF-8 cannot encode (lone surrogates) becomes U+FFFD; longer text is cut and ends in
    an ellipsis. ASCII text within the limit is returned as it is, at almost no cost.
    """
    if not value.isascii():
        value = _SURROGATES.sub(REPLACEMENT, value)
    return _cut(value, limit)


def one_line(value: str, limit: int = MAX_TEXT) -> str:
    """:func:`clean_text` for text shown on one line: line breaks and tabs become one space,
    other control characters and bidirectional overrides become U+FFFD."""
    value = _WHITESPACE.sub(" ", value)
    if not value.isprintable():
        value = _UNPRINTABLE.sub(REPLACEMENT, value)
    return clean_text(value.strip(), limit)


def _cut(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: max(0, limit - 1)] + ELLIPSIS


def text_or_none(value: object, limit: int = MAX_TEXT) -> str | None:
    """:func:`one_line` of ``value`` if it is a string, else None."""
    return one_line(value, limit) if isinstance(value, str) else None


def bounded_int(value: object, low: int = 0, high: int = MAX_INT) -> int | None:
    """``value`` if it is an integer (not a bool) in ``[low, high]``, else None."""
    if type(value) is int and low <= value <= high:
        return value
    return None


def bad_size(value: object, high: int = MAX_INT) -> str:
    """Why ``value`` is not a size in ``[0, high]``, for a problem message."""
    if type(value) is not int:
        return f"expected a size in bytes, got {describe(value)}"
    if value < 0:
        return f"a negative size: {describe(value)}"
    limit = "the VM's RAM" if high < MAX_INT else "2^63"
    return f"{describe(value)} is more than {limit} ({high})"


def clean_json(
    value: object,
    *,
    max_depth: int = MAX_DEPTH,
    max_items: int = MAX_ITEMS,
    max_text: int = MAX_TEXT,
    max_nodes: int = MAX_NODES,
) -> Any:
    """A copy of a decoded JSON value that every consumer can serve and store.

    Text as :func:`clean_text` (object keys at most 128 characters); integers outside
    [-2^63, 2^64) and other values JSON cannot carry become a short description in a string;
    NaN and infinities become null; nesting below ``max_depth`` levels, members beyond
    ``max_items`` per object or array and values beyond ``max_nodes`` in all are replaced by a
    note saying so. Never raises, and never recurses deeper than ``max_depth``.
    """
    if _flat_and_clean(value, max_items, max_text):
        return dict(value)  # type: ignore[call-overload]  # checked: a dict
    budget = [max_nodes]
    return _clean(value, max_depth, max_items, max_text, budget)


def _flat_and_clean(value: object, max_items: int, max_text: int) -> bool:
    """Whether ``value`` is an object of ASCII names and plain values that need no cleaning:
    what almost every QMP event carries, checked faster than it is cleaned."""
    if type(value) is not dict or len(value) > min(32, max_items):
        return False
    for key, member in value.items():
        if type(key) is not str or len(key) > 128 or not key.isascii():
            return False
        kind = type(member)
        if kind is int:
            if not -(2**63) <= member < 2**64:
                return False
        elif kind is str:
            if len(member) > max_text or not member.isascii():
                return False
        elif member is not None and kind is not bool:
            return False
    return True


def _clean(value: object, depth: int, items: int, text: int, budget: list[int]) -> Any:
    if budget[0] <= 0:
        return "(dropped: too many values)"
    budget[0] -= 1
    if value is None or isinstance(value, bool):
        return value
    if type(value) is int:
        return value if -(2**63) <= value < 2**64 else describe(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return clean_text(value, text)
    if isinstance(value, Mapping | list | tuple):
        if depth <= 0:
            return f"(dropped: nested deeper than {MAX_DEPTH} levels)"
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for n, (key, member) in enumerate(value.items()):
                if n >= items:
                    out["…"] = f"{len(value) - items} more members dropped"
                    break
                name = clean_text(key, 128) if isinstance(key, str) else describe(key)
                out[name] = _clean(member, depth - 1, items, text, budget)
            return out
        cleaned = [_clean(v, depth - 1, items, text, budget) for v in value[:items]]
        if len(value) > items:
            cleaned.append(f"… {len(value) - items} more items dropped")
        return cleaned
    return describe(value)


def describe(value: object) -> str:
    """A short, safe description of an untrusted value, for a problem message."""
    if type(value) is int:
        # Printing a huge int is slow and, past 4300 digits, an error.
        return str(value) if value.bit_length() <= 128 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, float | str | bool) or value is None:
        text = repr(value)  # quotes strings and escapes what is unprintable
        return text if len(text) <= 40 else f"{text[:37]}..."
    return type_name(value)


def type_name(value: object) -> str:
    """The JSON type of ``value`` in words ("an integer", "null")."""
    if value is None:
        return "null"
    for kind, name in _JSON_TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


# bool before int: True is an int too.
_JSON_TYPE_NAMES: Final = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (Mapping, "an object"),
    (list, "an array"),
)


def vm_name(value: object) -> str | None:
    """A VM name from what a peer says (``-name``, a UUID) or a socket's file name: the
    characters of configured names (letters, digits, ``_.:@-``; others become ``_``), at most
    128; None for nothing usable, including QEMU's default all-zero UUID, which names nothing."""
    if not isinstance(value, str):
        return None
    cleaned = _NOT_NAME.sub("_", value.strip())[:MAX_VM_NAME]
    if not cleaned.strip("_") or cleaned == ZERO_UUID:
        return None
    return cleaned
