"""The systemd unit and its drop-in for libvirt hosts: verified and scored by systemd-analyze,
offline, and consistent with reclaimd's configuration."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.support import DEPLOY, setting_env_names

SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "reclaimd.service"
LIBVIRT_DROP_IN = SYSTEMD / "libvirt.conf"
# systemd-analyze security's 0-10 scale: 2.0 today; a change that weakens the sandbox fails here.
MAX_EXPOSURE = 2.5


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze not found: install Debian's systemd package", pytrace=False)
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's reclaimd, so verify can find it."""
    reclaimd = Path(sys.executable).with_name("reclaimd")
    assert reclaimd.exists(), f"{reclaimd} missing: install the project (pip install -e .)"
    path = tmp_path / "reclaimd.service"
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/reclaimd", f"ExecStart={reclaimd}")
    path.write_text(text)
    return path


def with_libvirt_drop_in(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as above, with the libvirt drop-in (or ``text``) where systemd looks for its
    drop-ins: NAME.service.d/ beside it."""
    unit = unit_for_this_machine(tmp_path)
    drop_ins = tmp_path / "reclaimd.service.d"
    drop_ins.mkdir()
    (drop_ins / "libvirt.conf").write_text(LIBVIRT_DROP_IN.read_text() if text is None else text)
    return unit


def directives(path: Path = UNIT) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    done = analyze("verify", str(unit_for_this_machine(tmp_path)))
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_systemd_analyze_verify_with_the_libvirt_drop_in(tmp_path: Path) -> None:
    done = analyze("verify", str(with_libvirt_drop_in(tmp_path)))
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_verify_reads_the_drop_in(tmp_path: Path) -> None:
    # What makes the test above a test of the drop-in: a mistake in it is reported.
    broken = LIBVIRT_DROP_IN.read_text() + "SupplementaryGroup=libvirt\n"
    done = analyze("verify", str(with_libvirt_drop_in(tmp_path, broken)))
    assert "libvirt.conf" in done.stderr and "SupplementaryGroup" in done.stderr, done.stderr


def test_the_libvirt_drop_in_adds_the_uri_the_group_and_no_capability(tmp_path: Path) -> None:
    found = directives(LIBVIRT_DROP_IN)
    keys = {key for key, _ in found}
    assert keys == {"After", "Environment", "SupplementaryGroups"}, keys
    assert dict(found)["SupplementaryGroups"] == "libvirt"
    assert set(dict(found)["After"].split()) == {"libvirtd.service", "virtqemud.service"}
    names = set(re.findall(r"^#?Environment=(RECLAIMD_\w+)=", LIBVIRT_DROP_IN.read_text(), re.M))
    assert "RECLAIMD_LIBVIRT" in names and names <= setting_env_names(), names
    assert ("Environment", "RECLAIMD_LIBVIRT=qemu:///system") in found
    # The unit's sandbox scores the same with the drop-in.
    done = analyze("security", "--offline=true", "--no-pager", str(with_libvirt_drop_in(tmp_path)))
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for reclaimd\.service: (\d+\.\d+)", done.stdout)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, done.stdout[-2000:]


def test_security_exposure_is_low(tmp_path: Path) -> None:
    done = analyze("security", "--offline=true", "--no-pager", str(unit_for_this_machine(tmp_path)))
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for reclaimd\.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


def test_one_capability_and_no_new_privileges() -> None:
    found = dict(directives())
    assert found["AmbientCapabilities"] == "CAP_SYS_PTRACE"
    assert found["CapabilityBoundingSet"] == "CAP_SYS_PTRACE"
    assert found["NoNewPrivileges"] == "yes"
    assert found["ProtectSystem"] == "strict"
    assert found["User"] == "reclaimd"
    # reclaimd must see other users' processes: these would hide QEMU from it.
    assert found.get("ProtectProc", "default") == "default"
    assert found.get("PrivateUsers", "no") == "no"


def test_environment_names_are_reclaimds_settings() -> None:
    names = {value.partition("=")[0] for key, value in directives() if key == "Environment"}
    env_file = (SYSTEMD / "reclaimd.env").read_text()
    names |= set(re.findall(r"^#?(RECLAIMD_\w+)=", env_file, re.MULTILINE))
    assert names and names <= setting_env_names(), names - setting_env_names()
    found = dict(directives())
    assert found["EnvironmentFile"] == "-/etc/reclaimd/reclaimd.env"


def test_listen_default_is_localhost() -> None:
    listen = [v for k, v in directives() if k == "Environment" and v.startswith("RECLAIMD_LISTEN=")]
    assert listen == ["RECLAIMD_LISTEN=127.0.0.1:9947"]


def test_sysusers_creates_the_units_user() -> None:
    line = (SYSTEMD / "reclaimd.sysusers.conf").read_text().splitlines()[-1]
    kind, name, *_ = line.split()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert (kind, name) == ("u", parser["Service"]["User"])


def test_mounts_files_and_limits() -> None:
    found = dict(directives())
    assert found["PrivateMounts"] == "yes"
    assert found["UMask"] == "0027"  # the journal and state are not world-readable
    assert int(found["LimitNOFILE"]) >= 4096
    # A configuration error (exit 2, one line in the journal) is not restarted in a loop.
    assert found["Restart"] == "on-failure" and found["RestartPreventExitStatus"] == "2"
