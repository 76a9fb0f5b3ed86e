"""``api.exposition`` writes exactly what prometheus_client's ``generate_latest`` writes.

Each case renders the same family both ways and compares the text byte for byte; properties
check random label values and numbers against prometheus_client's formatting and its parser.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from api.exposition import Family, Kind, format_value, render, render_labels

TRICKY_LABELS = (
    "plain",
    "",
    "back\\slash",
    "trailing backslash\\",
    'double "quote"',
    "new\nline",
    "\\n is not a newline",
    'all three: \\ " \n',
    "tab\tcarriage\rreturn",
    "ünïcødé ☃ 🐧 \u2028",
    "{braces},=commas",
)
TRICKY_VALUES = (
    math.inf,
    -math.inf,
    math.nan,
    0,
    0.0,
    -0.0,
    1e-7,
    1e21,
    1e16,
    2**53 - 1,
    2**53,
    2**53 + 1,
    2**64 - 1,
    True,
    False,
    1,
    -1,
    999_999,
    1_000_000,
    1_000_001,
    2_147_483_648,
    123_456_789.0,
    -123_456_789.0,
    0.1,
    1.5,
    5e-324,
    sys.float_info.max,
)
TRICKY_HELP = 'Help with a \\ backslash, "quotes",\na newline, \\n (not one) and ünïcødé'


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def upstream(*families: Metric) -> str:
    return generate_latest(_Families(families)).decode()


def upstream_family(
    kind: Kind, name: str, help: str, labels: Sequence[str]
) -> GaugeMetricFamily | CounterMetricFamily:
    cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
    return cls(name, help, labels=list(labels))


@pytest.mark.parametrize("value", TRICKY_VALUES, ids=repr)
def test_format_value_matches_prometheus_client(value: float) -> None:
    assert format_value(value) == floatToGoString(value)


@pytest.mark.parametrize("kind", ["gauge", "counter"])
def test_family_matches_prometheus_client(kind: Kind) -> None:
    ours = Family("qemu_test_bytes", TRICKY_HELP, kind)
    # Declared in the order a caller thinks of them; both sides must sort them by name.
    theirs = upstream_family(kind, "qemu_test_bytes", TRICKY_HELP, ("vm", "event"))
    for label in TRICKY_LABELS:
        for i, value in enumerate(TRICKY_VALUES):
            ours.add(render_labels({"vm": label, "event": f"E{i}"}), value)
            theirs.add_metric([label, f"E{i}"], value)
    assert len(theirs.samples) == len(TRICKY_LABELS) * len(TRICKY_VALUES)
    assert render([ours]) == upstream(theirs)


@pytest.mark.parametrize("kind", ["gauge", "counter"])
def test_family_without_samples_keeps_help_and_type(kind: Kind) -> None:
    ours = Family("qemu_empty", "No VM has this", kind)
    text = render([ours])
    assert text == upstream(upstream_family(kind, "qemu_empty", "No VM has this", ("vm",)))
    assert text.count("\n") == 2  # HELP and TYPE, no sample line


def test_unlabelled_sample_and_family_order() -> None:
    count = Family("reclaimd_vms", "VMs known to reclaimd")
    count.add(render_labels({}), 500)
    up = Family("qemu_vm_up", "up")
    up.add(render_labels({"vm": "a"}), True)
    theirs_count = GaugeMetricFamily("reclaimd_vms", "VMs known to reclaimd", labels=[])
    theirs_count.add_metric([], 500)
    theirs_up = GaugeMetricFamily("qemu_vm_up", "up", labels=["vm"])
    theirs_up.add_metric(["a"], True)
    assert render([count, up]) == upstream(theirs_count, theirs_up)
    assert render([up, count]) == upstream(theirs_up, theirs_count)


def test_four_labels_are_sorted_by_name() -> None:
    labels = {"vm": "db1", "uuid": "", "qemu_version": "7.2.22", "attach": "poll"}
    assert render_labels(labels) == '{attach="poll",qemu_version="7.2.22",uuid="",vm="db1"}'


@pytest.mark.parametrize("name", ["", "9lives", "has-dash", "has space", "ü"])
def test_invalid_metric_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="metric name"):
        Family(name, "help")


def test_counter_names_are_given_without_total() -> None:
    assert Family("qemu_events", "help", "counter").name == "qemu_events_total"
    with pytest.raises(ValueError, match="without _total"):
        Family("qemu_events_total", "help", "counter")


@pytest.mark.parametrize("name", ["", "9lives", "has-dash", "has:colon", "__reserved"])
def test_invalid_label_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="label name"):
        render_labels({name: "value"})


# Numbers near the places where the formatting changes: the exponent threshold at 10**6, the
# exact-int limit 2**53 and Python's own switch to exponents at 10**16.
_edges = [
    edge + delta for edge in (10**6, 10**7, 2**53, 10**16, 10**17) for delta in (-2, -1, 0, 1, 2)
]
numbers = st.one_of(
    st.floats(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(_edges),
    st.booleans(),
)
label_values = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


@settings(max_examples=500, deadline=None)
@given(numbers)
def test_any_number_formats_like_prometheus_client(value: float) -> None:
    assert format_value(value) == floatToGoString(value)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["gauge", "counter"]),
    st.lists(st.tuples(label_values, label_values, numbers), max_size=10),
)
def test_random_families_match_prometheus_client(
    kind: Kind, samples: list[tuple[str, str, float]]
) -> None:
    ours = Family("qemu_random", "random", kind)
    theirs = upstream_family(kind, "qemu_random", "random", ("vm", "event"))
    for vm, event, value in samples:
        ours.add(render_labels({"vm": vm, "event": event}), value)
        theirs.add_metric([vm, event], value)
    assert render([ours]) == upstream(theirs)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["gauge", "counter"]),
    st.lists(st.tuples(label_values, numbers), max_size=10),
)
def test_text_parses_back_to_the_same_samples(kind: Kind, samples: list[tuple[str, float]]) -> None:
    family = Family("qemu_parsed", "parsed back", kind)
    for i, (vm, value) in enumerate(samples):
        family.add(render_labels({"vm": vm, "i": str(i)}), value)

    parsed = list(text_string_to_metric_families(render([family])))

    assert [(p.name, p.type, p.documentation) for p in parsed] == [
        ("qemu_parsed", kind, "parsed back")
    ]
    got = parsed[0].samples
    assert [s.name for s in got] == [family.name] * len(samples)
    assert [s.labels for s in got] == [{"vm": vm, "i": str(i)} for i, (vm, _) in enumerate(samples)]
    for sample, (_, value) in zip(got, samples, strict=True):
        expected = float(value)
        if math.isnan(expected):
            assert math.isnan(sample.value)
        else:
            assert sample.value == expected
            assert math.copysign(1.0, sample.value) == math.copysign(1.0, expected)


# -- what a hostile VM can put in a label or a value ----------------------------------------


@given(st.text(max_size=30), st.integers(min_value=-(10**400), max_value=10**400))
def test_any_label_text_and_any_integer_render_and_encode(label: str, value: int) -> None:
    # Lone surrogates (category Cs, excluded above) become U+FFFD instead of failing the
    # scrape; an int beyond a float's range is an infinity of its sign, never an OverflowError.
    family = Family("qemu_x", "x")
    family.add(render_labels({"vm": label}), value)
    text = render([family])
    text.encode()
    (parsed,) = text_string_to_metric_families(text)
    (sample,) = parsed.samples
    assert sample.labels["vm"] == "".join(
        "\ufffd" if 0xD800 <= ord(c) < 0xE000 else c for c in label
    )
    if abs(value) < 2**1000:
        assert sample.value == float(value)
    else:
        assert sample.value == (math.inf if value > 0 else -math.inf)


def test_a_lone_surrogate_in_a_label_becomes_a_replacement_character() -> None:
    assert render_labels({"vm": "a\ud800b"}) == '{vm="a\ufffdb"}'
    assert format_value(10**400) == "+Inf" and format_value(-(10**400)) == "-Inf"
