"""docker-compose.yml and the images: valid by the Compose Specification's JSON schema (as
vendored by check-jsonschema), and consistent with reclaimd's configuration contract.

No Docker engine runs on CI: the images are not built and the stack is not started there; the
tests that would need one say so and are listed at the end of the run. What the stack starts
also runs without Docker, and tests/e2e/test_prometheus_stack.py runs it that way.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from daemon.config import load_settings
from tests.deploy.support import DEPLOY, REPO, load_yaml, setting_env_names

COMPOSE = REPO / "docker-compose.yml"
DOCKER = DEPLOY / "docker"
SERVICES = {"reclaimd", "prometheus", "grafana", "demo-vm"}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (volume name or host path) of a service's short-syntax volumes."""
    found = {}
    for entry in svc.get("volumes", []):
        source, target, *_ = entry.split(":")
        found[target] = source
    return found


def dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def directive(text: str, name: str) -> list[str]:
    """Arguments of every ``NAME`` instruction of a Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", joined, re.MULTILINE)]


def test_compose_file_is_valid_by_the_compose_spec_schema() -> None:
    done = validate_compose(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_schema_validation_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["reclaimd"]["healthcheck"]["intervall"] = "10s"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    done = validate_compose(path)
    assert done.returncode != 0
    assert "intervall" in done.stdout + done.stderr


def test_services() -> None:
    assert set(compose()["services"]) == SERVICES


def test_ports_are_published_on_localhost_only() -> None:
    published = {
        name: svc.get("ports", []) for name, svc in compose()["services"].items() if "ports" in svc
    }
    assert set(published) == {"reclaimd", "prometheus", "grafana"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_healthchecks_gate_every_dependency() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        for dependency, condition in svc.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in services[dependency]
    assert set(services["prometheus"]["depends_on"]) == {"reclaimd"}
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}
    assert set(services["demo-vm"]["depends_on"]) == {"reclaimd"}


def test_reclaimd_environment_is_reclaimds_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    env = service("reclaimd")["environment"]
    assert set(env) <= setting_env_names(), set(env) - setting_env_names()
    for name in [name for name in os.environ if name.startswith("RECLAIMD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, str(value))
    settings = load_settings()  # raises ConfigError on any value reclaimd would refuse
    assert settings.token is None, "the compose file must not ship a token"
    (port,) = service("reclaimd")["ports"]
    host_ip, host_port, container_port = str(port).split(":")
    assert host_ip == "127.0.0.1"
    assert int(container_port) == settings.listen_port == int(host_port)
    assert settings.socket_glob is not None
    volumes = mounts(service("reclaimd"))
    assert str(PurePosixPath(settings.socket_glob).parent) in volumes
    assert str(PurePosixPath(settings.journal).parent) in volumes


def test_secrets_come_from_the_environment_without_defaults() -> None:
    reclaimd_env = service("reclaimd")["environment"]
    # No value: compose takes it from .env or the shell, else leaves it unset (changes refused).
    assert "RECLAIMD_TOKEN" in reclaimd_env and reclaimd_env["RECLAIMD_TOKEN"] is None
    password = service("grafana")["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    # ${VAR:?message}: compose refuses to start without it; there is no default to fall back to.
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), password
    text = COMPOSE.read_text()
    assert not re.search(r"\$\{\w*(PASSWORD|TOKEN|SECRET)\w*:-", text), "secret with a default"


def test_qmp_socket_is_shared_and_matches_the_glob() -> None:
    glob = service("reclaimd")["environment"]["RECLAIMD_SOCKET_GLOB"]
    demo = service("demo-vm")
    socket_path = demo["environment"]["QMP_SOCKET"]
    assert fnmatch.fnmatch(socket_path, glob)
    directory = str(PurePosixPath(socket_path).parent)
    assert mounts(demo)[directory] == mounts(service("reclaimd"))[directory]
    assert mounts(demo)[directory] in compose()["volumes"], "the socket must be on a volume"
    assert socket_path in demo["healthcheck"]["test"]


def test_reclaimd_can_see_the_demo_guests_process() -> None:
    # Same PID namespace, and QEMU runs as reclaimd's uid and gid: /proc/PID/pagemap of a
    # process with the same ids needs no capability.
    assert service("demo-vm")["pid"] == "service:reclaimd"
    assert service("demo-vm")["user"] == service("reclaimd")["user"] == "10001:10001"
    assert directive(dockerfile("reclaimd.Dockerfile"), "USER") == ["10001:10001"]
    assert directive(dockerfile("demo-vm.Dockerfile"), "USER") == ["10001:10001"]


def test_containers_are_unprivileged() -> None:
    for name, svc in compose()["services"].items():
        assert not svc.get("privileged"), name
        assert svc.get("cap_drop") == ["ALL"], name
        assert "cap_add" not in svc, name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("pid") != "host" and svc.get("network_mode") != "host", name


def test_prometheus_scrapes_reclaimd_where_it_listens() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    listen = service("reclaimd")["environment"]["RECLAIMD_LISTEN"]
    assert host == "reclaimd" and port == listen.rpartition(":")[2]
    assert mounts(service("prometheus"))["/etc/prometheus"] == "./deploy/prometheus"
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    url = datasource["datasources"][0]["url"]
    assert url == "http://prometheus:9090"
    assert "--web.listen-address=0.0.0.0:9090" in service("prometheus")["command"]


def test_reclaimd_image_agrees_with_the_compose_file() -> None:
    text = dockerfile("reclaimd.Dockerfile")
    listen = service("reclaimd")["environment"]["RECLAIMD_LISTEN"]
    port = listen.rpartition(":")[2]
    assert directive(text, "EXPOSE") == [port]
    assert f"RECLAIMD_LISTEN={listen}" in " ".join(directive(text, "ENV"))
    # Healthy once ready: the first attach attempts made, so dependants see real VMs.
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(directive(text, "HEALTHCHECK"))
    assert any(
        f"http://127.0.0.1:{port}/readyz" in part
        for part in service("reclaimd")["healthcheck"]["test"]
    )
    assert directive(text, "ENTRYPOINT") == ['["reclaimd"]']
    env_names = {
        m.group(1) for m in re.finditer(r"\b(RECLAIMD_\w+)=", " ".join(directive(text, "ENV")))
    }
    assert env_names <= setting_env_names()


def test_demo_vm_script_is_valid_shell_and_matches_compose() -> None:
    script = DOCKER / "demo-vm.sh"
    done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    for name in service("demo-vm")["environment"]:
        assert f"${{{name}" in text, f"demo-vm.sh ignores {name}"
    assert "free-page-reporting=on" in text
    assert "server=on,wait=off" in text  # connect mode: reclaimd attaches, QEMU waits for no one


def test_dockerignore_files_sit_beside_their_dockerfiles() -> None:
    for name in ("reclaimd.Dockerfile", "demo-vm.Dockerfile"):
        ignore = DOCKER / f"{name}.dockerignore"
        assert ignore.read_text().splitlines()[1] == "*"
        for kept in re.findall(r"^!(\S+)$", ignore.read_text(), re.MULTILINE):
            assert (REPO / kept.rstrip("/")).exists(), f"{ignore.name} keeps missing {kept}"


def _docker(*args: str) -> subprocess.CompletedProcess[str] | None:
    if shutil.which("docker") is None:
        return None
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_docker_compose_config(not_run: Callable[[str], None], tmp_path: Path) -> None:
    version = _docker("compose", "version")
    if version is None or version.returncode != 0:
        not_run(
            "`docker compose config`: the docker compose plugin is not installed here; "
            "docker-compose.yml was checked against the Compose Specification schema only"
        )
    env = tmp_path / ".env"
    env.write_text("GRAFANA_ADMIN_PASSWORD=test-only-password\n")
    done = _docker("compose", "-f", str(COMPOSE), "--env-file", str(env), "config", "-q")
    assert done is not None and done.returncode == 0, done.stderr if done else ""


def test_images_build(not_run: Callable[[str], None]) -> None:
    info = _docker("info", "--format", "{{.ServerVersion}}")
    if info is None or info.returncode != 0:
        not_run(
            "building the reclaimd and demo-vm images and starting the compose stack: no Docker "
            "engine on this machine (reclaimd, Prometheus and the demo guest script run without "
            "Docker in tests/e2e/test_prometheus_stack.py)"
        )
    for name, tag in (
        ("reclaimd.Dockerfile", "reclaimd:test"),
        ("demo-vm.Dockerfile", "demo:test"),
    ):
        done = subprocess.run(
            ["docker", "build", "-f", str(DOCKER / name), "-t", tag, str(REPO)],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-4000:]


def test_compose_file_is_compose_v2() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    assert yaml.safe_load(text)["name"] == "reclaimd"
    assert "Compose v2" in text  # said where the file shows how to run it


def test_the_image_installs_pinned_dependencies() -> None:
    """Every runtime dependency of pyproject.toml, transitive ones too, and those of the libvirt
    extra (the image's EXTRAS=libvirt), at one exact version that satisfies pyproject's range,
    and the Dockerfile installs with those constraints."""
    from packaging.requirements import Requirement

    constraints = DEPLOY / "docker" / "constraints.txt"
    pins: dict[str, str] = {}
    for line in constraints.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"{line!r} is not pinned to one version"
            pins[canonical(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["libvirt"]]:
        requirement = Requirement(text)
        pinned = pins.get(canonical(requirement.name))
        assert pinned is not None, f"{requirement.name} is not pinned in {constraints.name}"
        assert requirement.specifier.contains(pinned), f"{requirement.name}=={pinned}: {text}"
    run = " ".join(directive(dockerfile("reclaimd.Dockerfile"), "RUN"))
    assert "-c constraints.txt" in run
    ignore = (DEPLOY / "docker" / "reclaimd.Dockerfile.dockerignore").read_text()
    assert "!deploy/docker/constraints.txt" in ignore.splitlines()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
