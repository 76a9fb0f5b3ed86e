"""``/metrics`` in both exposition formats, compressed or not, read back by the parsers
Prometheus users rely on: every family name once, every label's sum meaningful, stable identity.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable

import httpx
import pytest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from api.app import create_app
from api.metrics import exposition
from daemon.config import Settings
from daemon.fleet import Fleet
from daemon.service import Reclaimd
from daemon.untrusted import ZERO_UUID
from tests.api.test_exposition_metrics import big_fleet
from tests.api.test_metrics_golden import NOW, known_fleet

Parser = Callable[[str], Iterable[Metric]]
FORMATS: list[tuple[bool, Parser]] = [(False, parse_text), (True, parse_openmetrics)]
# Spelt out, not taken from api.metrics or prometheus_client, so that a change of either shows.
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_1_0_0 = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.mark.parametrize(("openmetrics", "parse"), FORMATS, ids=["text", "openmetrics"])
def test_every_family_name_is_unique(openmetrics: bool, parse: Parser) -> None:
    text = exposition(big_fleet(20), now=NOW, openmetrics=openmetrics).decode()
    names = Counter(family.name for family in parse(text))
    assert {name for name, count in names.items() if count > 1} == set()
    # The daemon's own and the process's families are there, beside the fleet's.
    for name in ("qemu_vm_up", "qemu_reported_bytes", "reclaimd_build_info"):
        assert name in names
    for name in ("process_resident_memory_bytes", "process_open_fds", "python_info"):
        assert name in names


def test_openmetrics_ends_with_eof_and_names_counter_families_without_total() -> None:
    text = exposition(known_fleet(), now=NOW, openmetrics=True).decode()
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    assert "# TYPE qemu_reported_bytes counter\n" in text
    assert 'qemu_reported_bytes_total{vm="web1"} 6.7108864e+08\n' in text
    assert "# TYPE qemu_reported_absent_bytes gauge\n" in text


def _samples(fleet: Fleet, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = exposition(fleet, now=NOW).decode()
    (family,) = (f for f in parse_text(text) if f.name == name)
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


def test_sums_over_a_label_mean_something() -> None:
    fleet = known_fleet()
    web = fleet.get("web1")
    assert web is not None and web.estimate is not None
    parts = web.estimate.components
    returned = _samples(fleet, "qemu_returned_bytes")
    assert sum(returned.values()) == (parts["ballooned"].bytes or 0) + (
        parts["reported"].bytes or 0
    )
    split = _samples(fleet, "qemu_guest_free_resident_parts_bytes")
    (free_resident,) = _samples(fleet, "qemu_guest_free_resident_bytes").values()
    assert sum(split.values()) == free_resident == parts["free_resident"].bytes


def test_the_stats_time_is_a_timestamp() -> None:
    stamps = _samples(known_fleet(), "qemu_guest_stats_last_update_timestamp_seconds")
    assert stamps == {(("vm", "db1"),): NOW - 10, (("vm", "web1"),): NOW - 3}


def test_qemus_default_uuid_is_not_exported_as_an_identity() -> None:
    fleet = known_fleet()
    web = fleet.get("web1")
    assert web is not None
    web.uuid = ZERO_UUID
    info = _samples(fleet, "qemu_vm_info")
    uuids = {dict(labels)["vm"]: dict(labels)["uuid"] for labels in info}
    assert uuids == {"web1": "", "db1": ""}


def test_promtool_check_metrics_is_clean() -> None:
    # promtool reads the text format only (OpenMetrics is checked by the parser above).
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found on PATH: install Prometheus", pytrace=False)
    body = exposition(big_fleet(20), now=NOW)
    done = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    report = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"promtool check metrics is not clean:\n{report}"


@pytest.mark.parametrize(
    ("accept", "encoding", "content_type", "gzipped"),
    [
        ("", "", TEXT_0_0_4, False),
        # What Prometheus 2.x and 3.x send: OpenMetrics preferred.
        (
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1",
            "gzip",
            OPENMETRICS_1_0_0,
            True,
        ),
        ("text/plain;version=0.0.4", "gzip;q=0, identity", TEXT_0_0_4, False),
        ("application/openmetrics-text;q=0", "deflate, GZIP", TEXT_0_0_4, True),
    ],
)
async def test_the_route_negotiates_format_and_encoding(
    settings: Settings, accept: str, encoding: str, content_type: str, gzipped: bool
) -> None:
    daemon = Reclaimd(settings)  # not started: the route only reads the fleet
    daemon.fleet = known_fleet()
    app = create_app(settings, daemon)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        reply = await client.get(
            "/metrics", headers={"Accept": accept, "Accept-Encoding": encoding}
        )
    assert reply.status_code == 200
    assert reply.headers["content-type"] == content_type
    assert reply.headers.get("content-encoding") == ("gzip" if gzipped else None)
    assert "Accept-Encoding" in reply.headers["vary"]
    # httpx decodes gzip: the body read back is the exposition either way.
    parse = parse_openmetrics if content_type == OPENMETRICS_1_0_0 else parse_text
    assert "qemu_vm_up" in {family.name for family in parse(reply.text)}


@pytest.mark.parametrize("accept", ["", "*/*", "text/plain", "text/plain;version=0.0.4"])
def test_the_text_content_type_is_the_one_prometheus_client_answers(accept: str) -> None:
    # prometheus_client's own negotiation names the classic text format for these; its
    # CONTENT_TYPE_LATEST (version=1.0.0) is not what either writer produces.
    assert choose_encoder(accept)[1] == TEXT_0_0_4


def test_the_openapi_document_declares_the_content_types_served(settings: Settings) -> None:
    doc = create_app(settings, Reclaimd(settings)).openapi()
    content = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == [TEXT_0_0_4, OPENMETRICS_1_0_0]
