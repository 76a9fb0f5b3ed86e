"""Prometheus configuration, recording rules and alerts, checked with Prometheus's own promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.support import DEPLOY, REPO, load_yaml

PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = PROMETHEUS / "tests" / "reclaimd.rules.test.yml"


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool not found: install Debian's prometheus package", pytrace=False)
    return subprocess.run(
        [tool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> list[dict[str, object]]:
    return [rule for path in RULE_FILES for g in load_yaml(path)["groups"] for rule in g["rules"]]


def test_rule_files_exist() -> None:
    assert [p.name for p in RULE_FILES] == ["reclaimd.alerts.yml", "reclaimd.rules.yml"]


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", *RULE_FILES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_config_loads_the_rules() -> None:
    done = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(RULE_FILES)} rule files found" in done.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    done = promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_rule_unit_tests_fail_when_a_rule_is_wrong(tmp_path: Path) -> None:
    # The unit tests must be able to fail: loosen one alert and they must notice.
    (tmp_path / "rules").mkdir()
    for path in RULE_FILES:
        text = path.read_text()
        if path.name == "reclaimd.alerts.yml":
            text = text.replace("expr: qemu_vm_up == 0", "expr: qemu_vm_up == 2")
            assert "qemu_vm_up == 2" in text
        (tmp_path / "rules" / path.name).write_text(text)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    done = promtool("test", "rules", tmp_path / "tests" / RULE_TESTS.name)
    assert done.returncode != 0
    assert "QemuVMDown" in done.stdout + done.stderr


def test_every_rule_is_unit_tested() -> None:
    tests = load_yaml(RULE_TESTS)["tests"]
    alert_tests = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    # An alert test counts only if some case expects it to fire.
    firing = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    expr_tests = {case["expr"] for t in tests for case in t.get("promql_expr_test", [])}
    alerts = {str(r["alert"]) for r in _rules() if "alert" in r}
    records = {str(r["record"]) for r in _rules() if "record" in r}
    assert alerts == alert_tests == firing
    assert records <= expr_tests


def test_the_issue_alerts_are_all_there() -> None:
    alerts = {str(r["alert"]) for r in _rules() if "alert" in r}
    assert {
        "QemuVMDown",
        "QemuGuestStatsStale",
        "QemuFreePageReportingOff",
        "QemuFreePageReportingIneffective",
        "QemuGuestMemoryLowWhileBallooned",
        "QemuBalloonNotConverging",
        "QemuReclaimableMemoryHigh",
    } <= alerts


def test_alerts_carry_severity_summary_and_description() -> None:
    for rule in _rules():
        if "alert" in rule:
            labels = rule.get("labels") or {}
            annotations = rule.get("annotations") or {}
            assert isinstance(labels, dict) and isinstance(annotations, dict)
            assert labels.get("severity") in {"info", "warning", "critical"}, rule["alert"]
            assert annotations.get("summary") and annotations.get("description"), rule["alert"]
            assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"


def test_recording_rules_follow_the_naming_convention() -> None:
    for rule in _rules():
        if "record" in rule:
            level, metric, *_ = str(rule["record"]).split(":")
            assert level in {"vm", "instance", "instance_part"}, rule["record"]
            assert metric.startswith("qemu_"), rule["record"]


def test_prometheus_rule_for_kubernetes_has_the_same_groups() -> None:
    groups = [g for path in RULE_FILES for g in load_yaml(path)["groups"]]
    resource = load_yaml(DEPLOY / "kubernetes" / "prometheusrule.yaml")
    by_name = {g["name"]: g for g in resource["spec"]["groups"]}
    assert by_name == {g["name"]: g for g in groups}


def test_compose_scrape_target_names_the_host() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "reclaimd"
    (static,) = job["static_configs"]
    assert static["labels"]["instance"], "instance must name the QEMU host"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a document's headings: lower case, punctuation dropped, - for space."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_runbook_in_the_operations_guide() -> None:
    docs = REPO / "docs" / "operations.md"
    anchors = _anchors(docs.read_text())
    for rule in _rules():
        if "alert" in rule:
            annotations = rule["annotations"]
            assert isinstance(annotations, dict)
            url = str(annotations.get("runbook_url", ""))
            path, _, anchor = url.partition("#")
            assert path == "docs/operations.md", f"{rule['alert']}: runbook_url {url!r}"
            assert anchor in anchors, f"{rule['alert']}: no heading #{anchor} in {docs.name}"
