"""Command arguments checked the way QEMU's QAPI input visitor checks them, with its messages.

The visitor walks the declared members in order (missing or mistyped member: error), then
refuses any member it did not visit. Messages are QEMU 7.2's, word for word, because clients
match on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from daemon.simguest.wire import QMPError, generic

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1

Kind = Literal["int", "uint64", "str", "bool", "any", "capabilities"]
# QMP capabilities a client may enable in qmp_capabilities.
CAPABILITIES = ("oob",)

_EXPECTED = {
    "int": "integer",
    "uint64": "integer",
    "str": "string",
    "bool": "boolean",
    "capabilities": "array",
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    required: bool = True


def check(arguments: Mapping[str, Any], params: tuple[Param, ...]) -> dict[str, Any]:
    """Return the arguments if they fit ``params``; raise QEMU's GenericError otherwise."""
    for param in params:
        if param.name not in arguments:
            if param.required:
                raise generic(f"Parameter '{param.name}' is missing")
            continue
        _check_value(param.name, param.kind, arguments[param.name])
    known = {p.name for p in params}
    for name in arguments:
        if name not in known:
            raise generic(f"Parameter '{name}' is unexpected")
    return dict(arguments)


def _check_value(name: str, kind: Kind, value: Any) -> None:
    if kind == "any":
        return
    if kind == "capabilities":
        if not isinstance(value, list):
            raise _wrong_type(name, kind)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _wrong_type(f"{name}[{i}]", "str")
            if item not in CAPABILITIES:
                # QEMU 7.2 names the list element 'null' here; kept for fidelity.
                raise generic(f"Parameter 'null' does not accept value '{item}'")
        return
    if not _fits(kind, value):
        raise _wrong_type(name, kind)


def _fits(kind: Kind, value: Any) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    if kind == "uint64":
        return INT64_MIN <= value <= UINT64_MAX
    return INT64_MIN <= value <= INT64_MAX


def _wrong_type(name: str, kind: Kind) -> QMPError:
    return generic(f"Invalid parameter type for '{name}', expected: {_EXPECTED[kind]}")
