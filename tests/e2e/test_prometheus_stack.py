"""The monitoring stack end to end, without Docker: the demo guest booted by the compose stack's
own script (deploy/docker/demo-vm.sh), ``reclaimd serve`` configured as in docker-compose.yml
(a watched glob of QMP sockets), and a real Prometheus loading deploy/prometheus's config and
rules. Every query of every dashboard panel, annotation and variable must return data through
Prometheus's HTTP API, and every rule must load and evaluate without error.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from daemon.testguest import GuestImage
from tests.deploy.grafana_queries import (
    Query,
    dashboard_files,
    parse_label_values,
    queries,
    substitute,
    variable_queries,
)
from tests.deploy.support import DEPLOY, REPO
from tests.e2e.reclaimd_proc import ReclaimdProcess, free_port

pytestmark = pytest.mark.e2e

MiB = 1 << 20
VM = "demo"
HOST = "demo-host"  # the instance label deploy/prometheus/prometheus.yml gives the target
# Grafana's values for one host and one VM at a 1 s scrape interval.
VARIABLES = {
    "cluster": ".*",
    "instance": HOST,
    "vm": VM,
    "__rate_interval": "15s",
    "__interval": "5s",
    "__range": "10m",
}
# Short cycles so that reporting, refaults and the estimate all move within the test.
WORKLOAD = "alloc:128,hold:4,free,sleep:6,repeat"
DATA_TIMEOUT = 180.0


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self, what: str) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{what} exited with {self.popen.returncode}:\n{self.tail()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
def demo_vm(guest_image: GuestImage, short_dir: Path, tmp_path: Path) -> Iterator[Path]:
    """The compose stack's demo guest, booted by its entrypoint script; yields the QMP socket."""
    socket = short_dir / "qmp" / f"{VM}.qmp"
    log = tmp_path / "demo-vm.log"
    env = {
        **os.environ,
        "DEMO_VM_NAME": VM,
        "DEMO_VM_IMAGE": str(guest_image.directory),
        "DEMO_VM_WORKLOAD": WORKLOAD,
        "QMP_SOCKET": str(socket),
    }
    with log.open("wb") as out:
        popen = subprocess.Popen(
            ["sh", str(DEPLOY / "docker" / "demo-vm.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    vm = Process(popen, log)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            vm.check_alive("demo-vm.sh")
            assert time.monotonic() < deadline, f"no QMP socket after 30 s:\n{vm.tail()}"
            time.sleep(0.2)
        yield socket
    finally:
        vm.stop()


@dataclass
class Prometheus:
    url: str
    process: Process
    client: httpx.Client

    def api(self, path: str, **params: Any) -> Any:
        self.process.check_alive("prometheus")
        reply = self.client.get(f"/api/v1/{path}", params=params)
        body = reply.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]


@pytest.fixture
def prometheus(tmp_path: Path, reclaimd: ReclaimdProcess) -> Iterator[Prometheus]:
    """Prometheus with the committed config and rules, scraping reclaimd every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install Debian's prometheus package", pytrace=False)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{reclaimd.port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
    process = Process(popen, log)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=10)
    try:
        deadline = time.monotonic() + 30
        while True:
            process.check_alive("prometheus")
            try:
                if client.get("/-/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{process.tail()}"
            time.sleep(0.2)
        yield Prometheus(url, process, client)
    finally:
        client.close()
        process.stop()


@pytest.fixture
def reclaimd(demo_vm: Path, short_dir: Path) -> Iterator[ReclaimdProcess]:
    """reclaimd configured as in docker-compose.yml: it finds the guest through a socket glob."""
    proc = ReclaimdProcess(short_dir, ["--socket-glob", str(demo_vm.parent / "*.qmp")])
    try:
        yield proc
    finally:
        proc.stop()


def has_data(result: dict[str, Any]) -> bool:
    """True when a query result holds at least one number (NaN is no data to plot)."""
    if result["resultType"] == "matrix":
        values = [float(v) for series in result["result"] for _, v in series["values"]]
    elif result["resultType"] == "vector":
        values = [float(sample["value"][1]) for sample in result["result"]]
    else:  # scalar
        values = [float(result["result"][1])]
    return any(not math.isnan(v) for v in values)


def run(prom: Prometheus, query: Query, start: float) -> dict[str, Any]:
    expr = query.substituted(VARIABLES)
    if query.instant:
        return prom.api("query", query=expr)  # type: ignore[no-any-return]
    end = time.time()
    return prom.api("query_range", query=expr, start=start, end=end, step=1)  # type: ignore[no-any-return]


def test_every_dashboard_query_returns_data(
    reclaimd: ReclaimdProcess, prometheus: Prometheus
) -> None:
    started = time.time()
    reclaimd.wait_for(
        lambda: reclaimd.metric("qemu_guest_stats_valid", vm=VM) == 1.0,
        120,
        "the demo guest attached through the socket glob, with valid guest stats",
    )
    # A balloon target set through reclaimd: its target series exists only then, and the
    # guest's BALLOON_CHANGE events feed the events panel and the annotations.
    target = 448 * MiB
    reply = reclaimd.post(f"/api/v1/vms/{VM}/balloon", {"target_bytes": target})
    assert reply.status_code == 202, reply.text
    reclaimd.wait_for(
        lambda: reclaimd.metric("qemu_balloon_actual_bytes", vm=VM) == target,
        60,
        "the balloon to reach its target",
    )

    all_queries = [q for path in dashboard_files() for q in queries(path)]
    assert len(all_queries) > 40
    missing = list(all_queries)
    deadline = time.monotonic() + DATA_TIMEOUT
    while missing and time.monotonic() < deadline:
        missing = [q for q in missing if not has_data(run(prometheus, q, started))]
        if missing:
            time.sleep(2)
    assert not missing, "queries without data after {:.0f} s:\n{}\nreclaimd:\n{}".format(
        DATA_TIMEOUT,
        "\n".join(f"  {q.dashboard} {q.where}: {q.substituted(VARIABLES)}" for q in missing),
        reclaimd.tail(15),
    )

    # The dashboards' variables resolve to this host and this VM.
    for path in dashboard_files():
        for name, text in variable_queries(path):
            selector, label = parse_label_values(text)
            values = prometheus.api(
                f"label/{label}/values", **{"match[]": substitute(selector, VARIABLES)}
            )
            expected = {"cluster": [], "instance": [HOST], "vm": [VM]}[name]
            assert values == expected, (path.name, name, values)

    # Every recording rule and alert loaded and evaluates without error.
    groups = prometheus.api("rules")["groups"]
    committed = {
        g["name"]
        for f in (DEPLOY / "prometheus" / "rules").glob("*.yml")
        for g in yaml.safe_load(f.read_text())["groups"]
    }
    assert {g["name"] for g in groups} == committed
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))

    (target_state,) = prometheus.api("targets")["activeTargets"]
    assert target_state["health"] == "up", target_state["lastError"]
    assert target_state["labels"]["instance"] == HOST
