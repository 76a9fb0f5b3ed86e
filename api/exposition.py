"""A small writer of the Prometheus text format (0.0.4) and of OpenMetrics 1.0, byte-identical to
prometheus_client's.

``/metrics`` writes a few hundred samples per VM. Building prometheus_client metric families for
them (a ``Sample`` namedtuple and a label dict per sample, labels sorted again per sample at
output) costs far more event-loop time than writing the lines directly, so the fleet's series
are written here. The output must stay exactly what ``prometheus_client.generate_latest`` writes
for the same families (dashboards, alerts and the golden file depend on it): same escaping of
label values and HELP text, labels sorted by name, ``_total`` appended to counter names, values
formatted like its ``floatToGoString``. ``tests/api/test_exposition_*.py`` compare the two.
OpenMetrics differs only in the family lines: a counter's HELP and TYPE name the family without
``_total`` (its samples keep it), and a double quote in HELP text is escaped too; the caller
ends the body with ``# EOF``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Final, Literal

from daemon.untrusted import clean_text

Kind = Literal["gauge", "counter"]

# Legacy metric and label names: what every Prometheus version parses without quoting.
_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_EXACT_INTS: Final = 2**53  # every int below converts to float exactly
_checked_label_names: set[str] = set()  # a handful of constant names: check each once


def escape_label_value(value: str) -> str:
    """Escape backslash, newline and double quote, in that order (as prometheus_client).

    Text UTF-8 cannot encode (lone surrogates, from a VM) becomes U+FFFD first: label values
    come from VMs, and one that cannot be encoded would fail the whole scrape.
    """
    if not value.isascii():
        value = clean_text(value, len(value))
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_help(text: str, openmetrics: bool = False) -> str:
    """Escape backslash and newline; a double quote too in OpenMetrics (text 0.0.4 keeps it)."""
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if openmetrics else text


def format_value(value: float) -> str:
    """A sample value as prometheus_client's ``floatToGoString`` writes it.

    Python's ``repr`` of the float, except infinities and NaN spelled the Go way, and positive
    numbers with more than six digits before the point in exponent form (``2.147483648e+09``),
    because Go switches to exponents sooner than Python. Ints and bools are converted to float
    first, so an int above 2**53 is rounded exactly as prometheus_client rounds it; an int
    beyond the range of a float is written as an infinity of its sign (prometheus_client
    would raise, and fail the whole scrape for one value).
    """
    if type(value) is int and 0 <= value < _EXACT_INTS:
        # Most samples are byte counts: written from the int's digits, which is what repr()
        # of its float gives (exact below 2**53, and repr uses no exponent below 1e16).
        if value < 1_000_000:
            return f"{value}.0"
        digits = str(value)
        return f"{digits[0]}.{digits[1:]}".rstrip("0.") + f"e+{len(digits) - 1:02d}"
    try:
        d = float(value)
    except OverflowError:  # an int of more than about 308 digits
        d = math.inf if value > 0 else -math.inf
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if d != d:  # NaN
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def render_labels(labels: Mapping[str, str]) -> str:
    """``{name="value",...}`` sorted by label name, values escaped; "" for no labels.

    Render a label set once and pass it to every family that uses it (a VM's ``vm`` label is
    shared by dozens of families): that is most of what makes the writer cheap.
    """
    if not labels:
        return ""
    for name in labels:
        if name not in _checked_label_names:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise ValueError(f"invalid label name {name!r}")
            _checked_label_names.add(name)
    pairs = [f'{k}="{escape_label_value(v)}"' for k, v in sorted(labels.items())]
    return "{" + ",".join(pairs) + "}"


class Family:
    """One metric family: its HELP and TYPE lines, then one line per sample added.

    A family with no samples is still written (HELP and TYPE only), as prometheus_client does.
    The caller gives every sample of a family the same label names (the family does not check
    them per sample: that would cost as much as writing the line).
    """

    __slots__ = ("_lines", "family", "help", "kind", "name")

    def __init__(self, name: str, help: str, kind: Kind = "gauge") -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        # prometheus_client's counter families take the name without _total and add it.
        if kind == "counter" and name.endswith("_total"):
            raise ValueError(f"counter {name!r}: give the name without _total")
        self.family = name  # OpenMetrics' family name: a counter's without _total
        self.name = f"{name}_total" if kind == "counter" else name  # its samples' name
        self.help = help
        self.kind = kind
        self._lines: list[str] = []

    def add(self, labels: str, value: float) -> None:
        """One sample; ``labels`` comes from :func:`render_labels`."""
        self._lines.append(f"{self.name}{labels} {format_value(value)}\n")

    def header(self, openmetrics: bool = False) -> str:
        name = self.family if openmetrics else self.name
        return f"# HELP {name} {escape_help(self.help, openmetrics)}\n# TYPE {name} {self.kind}\n"


def render(families: Iterable[Family], openmetrics: bool = False) -> str:
    """The families' text, in the order given (OpenMetrics without its closing ``# EOF``)."""
    chunks: list[str] = []
    for family in families:  # one join for the whole text: it is about 1 MiB for 500 VMs
        chunks.append(family.header(openmetrics))
        chunks += family._lines
    return "".join(chunks)
