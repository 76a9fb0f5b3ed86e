"""The reclaimd command as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from api.version import VERSION
from tests.e2e.reclaimd_proc import ReclaimdProcess

RECLAIMD = [sys.executable, "-m", "daemon.cli"]


def test_serve_refuses_a_bad_vm_flag() -> None:
    done = subprocess.run(
        [*RECLAIMD, "serve", "--vm", "nope"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "expected NAME=ADDRESS" in done.stderr


def test_vms_table_from_a_running_daemon(sockdir: Path) -> None:
    absent = sockdir / "absent.qmp"
    daemon = ReclaimdProcess(sockdir, ["--vm", f"ghost=unix:{absent}"])
    try:
        done = subprocess.run(
            [*RECLAIMD, "vms", "--url", daemon.url], capture_output=True, text=True, timeout=60
        )
    finally:
        daemon.stop()
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()[:2]
    assert header.split()[:3] == ["VM", "UP", "MODE"]
    assert row.split()[:3] == ["ghost", "no", "connect"]


def test_vms_says_when_no_daemon_answers() -> None:
    done = subprocess.run(
        [*RECLAIMD, "vms", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot read" in done.stderr


# -- every start-up mistake: its exit code and the exact first line of stderr ------------------


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``reclaimd ARGS`` with no RECLAIMD_* from the caller's environment, 80 columns wide."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECLAIMD_")}
    clean["COLUMNS"] = "80"  # argparse wraps usage to the terminal's width
    return subprocess.run(
        [*RECLAIMD, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def scratch(tmp_path: Path) -> tuple[str, ...]:
    """Flags that keep a daemon started by mistake (a check that let a bad value through) off
    the default port and state directory."""
    return ("--listen", "127.0.0.1:0", "--journal", str(tmp_path / "journal.sqlite3"))


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def test_version() -> None:
    done = run_cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"reclaimd {VERSION}\n", "")


def test_a_bad_flag_prints_the_sub_commands_usage() -> None:
    done = run_cli("serve", "--bogus")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == "usage: reclaimd serve [-h] [--config CONFIG] [--vm NAME=ADDRESS]"
    assert lines[-1] == "reclaimd serve: error: unrecognized arguments: --bogus"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"RECLAIMD_POLL_INTERVAL": "abc"},
            "reclaimd: RECLAIMD_POLL_INTERVAL: Input should be a valid number, unable to parse "
            "string as a number (got 'abc')",
        ),
        (
            {"RECLAIMD_TOKEN": "short"},
            "reclaimd: RECLAIMD_TOKEN: token must be at least 16 characters (or unset to disable)",
        ),
        # A list setting is read as JSON by pydantic-settings, which raises its own error.
        (
            {"RECLAIMD_VM": "x"},
            "reclaimd: RECLAIMD_VM: not JSON (Expecting value: line 1 column 1 (char 0)) (got 'x')",
        ),
        (
            {"RECLAIMD_VM": '[{"name": "a", "address": "unix:/run/a.qmp", "bogus": 1}]'},
            "reclaimd: RECLAIMD_VM[0].bogus: unknown setting",
        ),
    ],
    ids=["not-a-number", "short-token", "vm-not-json", "unknown-vm-key"],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(
    env: dict[str, str], line: str, tmp_path: Path
) -> None:
    done = run_cli("serve", "--vm", f"a=unix:{tmp_path}/a.qmp", *scratch(tmp_path), env=env)
    assert done.returncode == 2
    assert done.stderr == line + "\n"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('colour = "blue"\n', "colour: unknown setting"),
        (
            'poll_interval = "often"\n',
            "poll_interval: Input should be a valid number, unable to parse string as a number "
            "(got 'often')",
        ),
        (
            '[[vm]]\nname = "a"\naddress = "/run/a.qmp"\n',
            "vm[0].address: address '/run/a.qmp': expected unix:/path or tcp:host:port",
        ),
        (
            '[[vm]]\nname = "a"\naddress = "unix:/run/a.qmp"\nbogus = 1\n',
            "vm[0].bogus: unknown setting",
        ),
    ],
    ids=["unknown-key", "wrong-type", "bad-vm", "unknown-vm-key"],
)
def test_a_config_error_is_one_line_naming_the_file(
    toml: str, message: str, tmp_path: Path
) -> None:
    config = tmp_path / "reclaimd.toml"
    config.write_text(toml)
    done = run_cli("serve", "--config", str(config), *scratch(tmp_path))
    assert done.returncode == 2
    assert done.stderr == f"reclaimd: config {config}: {message}\n"


def test_a_misspelt_variable_is_warned_about_in_json_logs() -> None:
    done = run_cli("--log-format", "json", "serve", env={"RECLAIMD_POLL_INTERVALL": "1"})
    warning = json.loads(first_line(done.stderr))
    assert warning["level"] == "WARNING"
    assert warning["message"] == (
        "RECLAIMD_POLL_INTERVALL is not a reclaimd setting (did you mean "
        "RECLAIMD_POLL_INTERVAL?): ignored"
    )
    assert done.returncode == 2  # and then: nothing to watch


def test_serve_with_nothing_to_watch_says_so() -> None:
    done = run_cli("serve")
    assert done.returncode == 2
    assert done.stderr == (
        "reclaimd: nothing to watch: give --vm, --socket-glob, --listen-socket, --libvirt or "
        "--proxmox (or vm, socket_glob, listen_socket, libvirt or proxmox in the config file)\n"
    )


def test_a_port_in_use_fails_before_start_up(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--journal",
            str(journal),
            "--vm",
            f"a=unix:{tmp_path}/a.qmp",
        )
    assert done.returncode == 2
    assert first_line(done.stderr) == (
        f"reclaimd: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert not journal.exists(), "the daemon started before the port was known to be free"


# -- what the daemon cannot start with, found once the checks above passed ---------------------


def test_an_unusable_journal_is_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--vm",
        f"a=unix:{tmp_path}/a.qmp",
        env={"RECLAIMD_JOURNAL": "/proc/nope/j.sqlite3"},
    )
    assert done.returncode == 2, done.stderr
    assert first_line(done.stderr) == (
        "reclaimd: journal /proc/nope/j.sqlite3: cannot create the journal's directory "
        "/proc/nope: No such file or directory"
    )
    assert "Traceback" not in done.stderr


def test_an_unusable_listen_socket_is_one_line(tmp_path: Path) -> None:
    done = run_cli("serve", "--listen-socket", "/proc/nope/l.sock", *scratch(tmp_path))
    assert done.returncode == 2, done.stderr
    assert first_line(done.stderr) == (
        "reclaimd: listen socket /proc/nope/l.sock: /proc/nope: No such file or directory"
    )
    assert "Traceback" not in done.stderr


def test_a_bad_web_config_is_one_line_as_the_other_errors(tmp_path: Path) -> None:
    web = tmp_path / "web-config.yml"
    web.write_text("tls_server_config: [unclosed\n")  # a YAML error spans several lines
    journal = tmp_path / "journal.sqlite3"
    done = run_cli(
        "serve",
        "--vm",
        f"a=unix:{tmp_path}/a.qmp",
        "--web-config",
        str(web),
        *scratch(tmp_path),
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"reclaimd: web config {web}: not YAML: ")
    assert done.stderr.count("\n") == 1, done.stderr
    assert not journal.exists(), "the daemon started with a web config it cannot use"
