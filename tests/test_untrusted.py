"""Cleaning and bounding what a VM sends: whatever comes in, what comes out can be served."""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.untrusted import (
    MAX_DEPTH,
    bad_size,
    bounded_int,
    clean_json,
    clean_text,
    describe,
    one_line,
    vm_name,
)

# What json.loads can give: any text (lone surrogates included), ints of any size, floats with
# NaN and infinities, and nesting.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=40,
)


def servable(value: Any) -> str:
    """What a REST response does with a value: strict JSON, encoded as UTF-8."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode().decode()


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_clean_text_is_valid_and_bounded(text: str, limit: int) -> None:
    cleaned = clean_text(text, limit)
    cleaned.encode()
    assert len(cleaned) <= limit
    if len(text) <= limit and text == text.encode(errors="ignore").decode():
        assert cleaned == text  # valid text within the limit is kept as it is


@given(st.text())
def test_one_line_has_no_line_breaks_or_controls(text: str) -> None:
    line = one_line(text, 200)
    line.encode()
    assert not any(unicodedata.category(c) == "Cc" for c in line)
    assert "\u202e" not in line and "\u2066" not in line  # no bidirectional overrides


@settings(max_examples=300)
@given(json_values)
def test_clean_json_is_always_servable(value: Any) -> None:
    servable(clean_json(value))


def test_clean_json_bounds_depth_items_and_size() -> None:
    deep: Any = []
    for _ in range(900):  # about what json.loads decodes before its own recursion limit
        deep = [deep]
    cleaned = clean_json(deep)
    depth = 0
    while isinstance(cleaned, list) and cleaned:
        cleaned, depth = cleaned[0], depth + 1
    assert depth == MAX_DEPTH and "nested deeper" in cleaned
    wide = clean_json({"k": list(range(10_000))})
    assert len(wide["k"]) == 257 and "9744 more items dropped" in wide["k"][-1]
    assert clean_json({"big": 10**400, "nan": math.nan, "s": "\ud800x"}) == {
        "big": "a 1329-bit integer",
        "nan": None,
        "s": "\ufffdx",
    }
    assert clean_json([[0] * 256] * 256)[-1] == "(dropped: too many values)"


def test_sizes_and_descriptions() -> None:
    assert bounded_int(5) == 5 and bounded_int(True) is None and bounded_int(-1) is None
    assert bounded_int(2**63) is None and bounded_int(7, 0, 6) is None
    assert bad_size(10**400) == "a 1329-bit integer is more than 2^63 (9223372036854775807)"
    assert bad_size(-5) == "a negative size: -5"
    assert bad_size("12") == "expected a size in bytes, got '12'"
    assert bad_size(2**40, 2**30) == "1099511627776 is more than the VM's RAM (1073741824)"
    assert describe("\ud800" * 100).startswith("'\\ud800") and len(describe("x" * 100)) == 40


def test_vm_names() -> None:
    assert vm_name("web1") == "web1"
    assert vm_name("we b/../\ud800") == "we_b_..__"
    assert vm_name("00000000-0000-0000-0000-000000000000") is None
    assert vm_name("\ud800\ud800") is None and vm_name("") is None and vm_name(5) is None
    assert vm_name("x" * 1000) == "x" * 128
