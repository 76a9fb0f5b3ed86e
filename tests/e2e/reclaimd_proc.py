"""Run ``reclaimd serve`` as a real subprocess on a free port, as an operator would."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

TOKEN = "e2e-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ReclaimdProcess:
    """``reclaimd serve ARGS`` with its own journal and port; ``stop()`` always ends it."""

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"reclaimd-{self.port}.log"
        self.journal = workdir / "journal.sqlite3"
        full_env = {
            **os.environ,
            "RECLAIMD_JOURNAL": str(self.journal),
            "RECLAIMD_TOKEN": TOKEN,
            "RECLAIMD_POLL_INTERVAL": "1",
            "RECLAIMD_STATS_INTERVAL": "1",
            **(env or {}),
        }
        argv = [sys.executable, "-m", "daemon.cli", "serve", "--listen", f"127.0.0.1:{self.port}"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*prefix, *argv, *args], env=full_env, stdout=log, stderr=log, cwd=workdir
            )
        self.client = httpx.Client(base_url=self.url, timeout=10)
        self.wait_for(lambda: self._healthy(), 30, "reclaimd /healthz")

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"reclaimd exited with {self.process.returncode}:\n{self.tail()}")
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, **params: Any) -> Any:
        reply = self.client.get(path, params=params)
        reply.raise_for_status()
        return reply.json()

    def post(self, path: str, body: dict[str, Any], token: str | None = TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.post(path, json=body, headers=headers)

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample of /metrics, or None when absent."""
        text = self.client.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
            if m and m.group(1) == name and (m.group(2) or "") == want:
                return float(m.group(3))
        return None

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what}\n{self.tail()}"
                )
            time.sleep(0.25)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.client.close()
        return self.process.returncode
