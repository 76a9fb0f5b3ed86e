"""The status page at ``/``: rendered from the fleet, safe with hostile names, and shown by a
real headless Chromium for a running demo with simulated guests, every VM on it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from api.app import create_app
from api.statuspage import bar_parts
from daemon.config import Settings
from daemon.service import Reclaimd
from tests.api.test_metrics_golden import known_fleet
from tests.e2e.reclaimd_proc import free_port


class Rows(HTMLParser):
    """The ``data-vm`` of every fleet row, and the text of each row's events cell."""

    def __init__(self) -> None:
        super().__init__()
        self.vms: list[str] = []
        self.events: dict[str, str] = {}
        self._in_events: str | None = None
        self.updated = ""
        self._in_updated = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "vm":
            self.vms.append(a.get("data-vm") or "")
        if tag == "span" and "events" in (a.get("class") or ""):
            self._in_events = self.vms[-1]
            self.events[self._in_events] = ""
        if tag == "span" and a.get("id") == "updated":
            self._in_updated = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._in_events, self._in_updated = None, False

    def handle_data(self, data: str) -> None:
        if self._in_events is not None:
            self.events[self._in_events] += data
        if self._in_updated:
            self.updated += data


def rows(html: str) -> Rows:
    parser = Rows()
    parser.feed(html)
    return parser


async def test_pages_render_the_fleet_and_escape_what_vms_say(settings: Settings) -> None:
    daemon = Reclaimd(settings)
    daemon.fleet = known_fleet()
    hostile = daemon.fleet.add('<img src=x onerror="alert(1)">', "unix:/run/<b>.qmp", "listen")
    hostile.last_error = "<script>alert(2)</script>"
    app = create_app(settings, daemon)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        page = await client.get("/")
        vm = await client.get("/vm/web1")
        hostile_page = await client.get("/vm/" + quote(hostile.name, safe=""))
        missing = await client.get("/vm/nope")
        script = await client.get("/static/status.js")
        other = await client.get("/static/../app.py")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert rows(page.text).vms == ['<img src=x onerror="alert(1)">', "db1", "web1"]
    for text in (page.text, hostile_page.text):
        assert "<script>alert" not in text and "<img src=x" not in text
    assert hostile_page.status_code == 200, hostile_page.text
    assert rows(hostile_page.text).vms == []  # its own page, with its name escaped in it
    assert "&lt;img src=x" in hostile_page.text
    assert "stranded" in vm.text and "data-component=reclaimable" in vm.text
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert script.headers["content-type"].startswith("text/javascript")
    assert other.status_code == 404


def test_the_bar_is_the_vms_ram() -> None:
    web = known_fleet().get("web1")
    assert web is not None and web.memory.ram_bytes is not None
    parts = dict(bar_parts(web))
    assert sum(parts.values()) == web.memory.ram_bytes
    assert parts["ballooned"] == 512 << 20 and parts["stranded"] == 200 << 20
    assert "free_resident" not in parts  # its split is known: drawn as its parts, not twice


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium not found: install Debian's chromium package (deploy/install-deps.sh)",
            pytrace=False,
        )
    return found


def dump_dom(url: str) -> str:
    # The virtual time budget lets the page's script fetch the REST API before the dump.
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_shows_every_vm_of_a_running_demo(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECLAIMD_")}
    argv = ["demo", "--guests", "3", "--ram", "64M", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", *argv, "--summary-every", "0"],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "demo.log").open("wb"),
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-2000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    names = [vm["name"] for vm in httpx.get(f"{base}/api/v1/vms").json()["vms"]]
                    if len(names) == 3:
                        break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the demo's API never showed its 3 VMs"
            time.sleep(0.3)
        page = rows(dump_dom(f"{base}/"))
        assert page.vms, "the status page shows no VM"
        assert sorted(page.vms) == sorted(names)
        # The script ran against the REST API: each row has its events (the attach at least).
        assert page.updated.startswith("updated"), page.updated
        for name in names:
            assert re.search(r"\battach\b", page.events[name]), page.events
        vm_page = dump_dom(f"{base}/vm/{names[0]}")
        assert 'data-component="reclaimable"' in vm_page or "data-component=reclaimable" in vm_page
        assert "<polyline" in vm_page  # the history drawn from the estimate
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
