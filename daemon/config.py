"""Daemon configuration: a TOML file, ``RECLAIMD_*`` environment variables and CLI flags.

Precedence, lowest to highest: defaults, config file, environment, command-line flags.
Defaults are safe: the API listens on localhost, and balloon changes are refused until a
token is configured.

Example ``reclaimd.toml``::

    listen = "127.0.0.1:9947"
    journal = "/var/lib/reclaimd/journal.sqlite3"
    socket_glob = "/run/qemu/*.qmp"          # connect mode, VMs follow their sockets
    listen_socket = "/run/reclaimd/qmp.sock"  # listen mode, QEMUs connect to reclaimd
    libvirt = "qemu:///system"                # every libvirt domain, through libvirt's API
    libvirt_nova_metadata = true              # OpenStack Nova's labels on qemu_vm_info
    libvirt_qmp_passthrough = false           # QMP through libvirt: taints the domains
    proxmox = "/"                             # a Proxmox VE host's VMs, in poll mode
    web_config = "/etc/reclaimd/web-config.yml"  # TLS and basic auth (api/webconfig.py)

    listen_socket_group = "libvirt-qemu"     # whose members' QEMUs may connect (socket 0660)
    balloon_min_bytes = "256M"                # no balloon target below this without "force"

    [[vm]]
    name = "web1"
    address = "unix:/run/qemu/web1.qmp"
    mode = "connect"                          # or "poll" for a socket another manager uses
    balloon_min_bytes = "1G"                  # this VM's floor when its guest sends no stats
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from daemon.model.cli import parse_size
from daemon.untrusted import one_line

log = logging.getLogger(__name__)
DEFAULT_PORT = 9947
ENV_PREFIX: Final = "RECLAIMD_"
AttachMode = Literal["connect", "poll"]


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and why."""


def _size(value: object) -> object:
    """A size in bytes from an integer or a string such as ``512M`` or ``4GiB``."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except argparse.ArgumentTypeError as exc:  # what the CLI's parser raises
            raise ValueError(str(exc)) from None
    return value


#: Bytes, from an integer or a size string (``512M``); positive.
Size = Annotated[int, BeforeValidator(_size), Field(gt=0)]


@dataclass(frozen=True)
class Address:
    """A QMP address: ``unix:/path`` or ``tcp:host:port``."""

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Address:
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path:
                raise ConfigError(f"address {text!r}: empty socket path")
            return cls("unix", path=path)
        if text.startswith("tcp:"):
            host, sep, port = text[len("tcp:") :].rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"address {text!r}: expected tcp:HOST:PORT")
            return cls("tcp", host=host.strip("[]"), port=int(port))
        raise ConfigError(f"address {text!r}: expected unix:/path or tcp:host:port")

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


class VMConfig(BaseModel):
    """One statically configured VM."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, as at the top
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")
    address: str
    mode: AttachMode = "connect"
    pid: int | None = Field(
        default=None,
        gt=0,
        description="QEMU's pid, for the host view where the socket cannot tell it (TCP attach)",
    )
    agent: str | None = Field(
        default=None,
        description="the guest agent's socket (unix:/path of a virtserialport chardev)",
    )

    @field_validator("agent")
    @classmethod
    def _valid_agent(cls, value: str | None) -> str | None:
        if value is not None and Address.parse(value).kind != "unix":
            raise ValueError(f"agent {value!r}: expected unix:/path")
        return value

    balloon_min_bytes: Size | None = Field(
        default=None,
        description="no balloon target below this unless forced (see Settings.balloon_min_bytes)",
    )
    reclaim: bool = Field(
        default=True, description="false: the reclaim controller leaves this VM alone"
    )

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        try:
            Address.parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value


def parse_vm_flag(text: str) -> VMConfig:
    """Parse ``NAME=ADDRESS`` or ``NAME=poll+ADDRESS`` from ``--vm``, each optionally followed
    by ``,agent=unix:/path`` (the guest agent's socket)."""
    name, sep, address = text.partition("=")
    if not sep:
        raise ConfigError(f"--vm {text!r}: expected NAME=ADDRESS")
    address, _, agent = address.partition(",agent=")
    mode: AttachMode = "connect"
    if address.startswith("poll+"):
        mode, address = "poll", address[len("poll+") :]
    try:
        return VMConfig(name=name, address=address, mode=mode, agent=agent or None)
    except ValueError as exc:
        raise ConfigError(f"--vm {text!r}: {exc}") from None


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/reclaimd")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "reclaimd"


class Settings(BaseSettings):
    """Everything the daemon reads at start; see the module docstring for the file format."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    listen: str = Field(
        default=f"127.0.0.1:{DEFAULT_PORT}",
        description="HOST:PORT of the REST API and /metrics; localhost unless told otherwise",
    )
    token: SecretStr | None = Field(
        default=None, description="Bearer token for balloon changes; unset refuses them all"
    )
    web_config: Path | None = Field(
        default=None,
        description="TLS and basic authentication of the API: a web config file in the format "
        "of Prometheus' exporter-toolkit (api/webconfig.py); unset: plain HTTP, no read auth",
    )
    http_max_connections: int = Field(
        default=256,
        ge=4,
        le=65536,
        description="HTTP connections open at most (and never over a quarter of the open "
        "files limit); beyond it the oldest idle connection is closed",
    )
    http_read_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="seconds a connection has to send a whole request (head and body)",
    )
    journal: Path = Field(default_factory=lambda: _default_state_dir() / "journal.sqlite3")
    journal_max_events: int = Field(default=1_000_000, ge=1000)
    journal_max_age_days: float = Field(default=30.0, gt=0)
    vm: list[VMConfig] = Field(default_factory=list)
    socket_glob: str | None = Field(
        default=None, description="glob of QMP sockets to attach in connect mode, watched"
    )
    socket_glob_mode: AttachMode = "connect"
    listen_socket: Path | None = Field(
        default=None, description="Unix socket that QEMUs connect to (listen mode)"
    )
    libvirt: str | None = Field(
        default=None,
        description="libvirt URI whose domains to attach through libvirt's API, e.g. "
        "qemu:///system (needs reclaimd[libvirt]); unset: no libvirt source",
    )
    libvirt_nova_metadata: bool = Field(
        default=False,
        description="OpenStack Nova's metadata of a libvirt domain (instance name, flavor, "
        "project and user) as labels of qemu_vm_info, as the libvirt exporters' "
        "--libvirt.export-nova-metadata; off: tenant names stay out of the metrics",
    )
    libvirt_qmp_passthrough: bool = Field(
        default=False,
        description="read what only QMP tells (the RAM blocks, the guest-physical memory "
        "map, file backends' paths, free page hinting) through virDomainQemuMonitorCommand; "
        "libvirt marks every domain it is used on as tainted (custom-monitor)",
    )
    proxmox: Path | None = Field(
        default=None,
        description="root of a Proxmox VE host's files (/ on the host): its VMs from "
        "ROOT/var/run/qemu-server/*.qmp in poll mode, named from ROOT/etc/pve/qemu-server",
    )
    listen_socket_group: str | None = Field(
        default=None,
        description="group (name or gid) whose members may connect to the listen socket; the "
        "socket is then 0660 and its directory 0710 with that group (else 0600 and 0700)",
    )
    listen_allowed_uids: list[int] = Field(
        default_factory=list,
        description="uids besides root and reclaimd's own that may connect to the listen socket",
    )
    balloon_min_bytes: Size | None = Field(
        default=None,
        description="no balloon target below this unless the request says force: the floor "
        "where a guest sends no usable stats (a VM's own setting takes precedence); with "
        "stats, also a minimum under the guest's used memory plus the margin",
    )
    reclaim: Literal["advise", "act"] = Field(
        default="advise",
        description="advise: balloon advice in REST and metrics, and a log line for each step "
        "the controller would take; act: the controller moves balloons (docs/operations.md)",
    )
    reclaim_step_bytes: Size = Field(
        default=256 << 20, description="most one VM's balloon inflates in one cycle"
    )
    reclaim_cooldown: float = Field(
        default=30.0, ge=0, le=86400, description="seconds between a VM's steps"
    )
    reclaim_host_target: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="inflate only while the host's memory use (1 - MemAvailable/MemTotal) is "
        "above this share",
    )
    poll_interval: float = Field(default=2.0, ge=0.1, le=3600)
    stats_interval: int = Field(
        default=2,
        ge=0,
        le=3600,
        description="guest-stats-polling-interval to set when a VM has 0; 0 leaves VMs alone",
    )
    scan_budget: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="CPU-seconds per second for host residency scans, shared by all VMs",
    )
    agents: bool = Field(
        default=True,
        description="read the guest's free lists through its guest agent where it has one",
    )
    agent_socket: str | None = Field(
        default=None,
        description="where a VM's guest agent socket is, with {name}, {socket} (its QMP "
        "socket) and {dir}; unset: SOCKET.qga, then DIR/NAME.qga, where one exists",
    )
    agent_refresh: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="seconds between agent reads while the guest's free memory stays put",
    )
    event_rate: float = Field(
        default=500.0,
        gt=0,
        description="QMP events a second applied per VM (QEMU itself sends guest-triggered "
        "events at most once a second each); beyond, they are dropped and counted",
    )
    event_burst: float = Field(default=5000.0, ge=1, description="events above the rate at once")
    command_timeout: float = Field(default=5.0, gt=0, le=600)
    connect_timeout: float = Field(default=5.0, gt=0, le=600)
    backoff_initial: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"listen {value!r}: expected HOST:PORT")
        return value

    @field_validator("token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("token must be at least 16 characters (or unset to disable)")
        return value

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


#: RECLAIMD_* variables that are not settings but are read elsewhere (the config file's path,
#: the vms command's URL, the test guest's cache and accelerator, the golden-file switch).
OTHER_ENV: Final = frozenset(
    {
        "RECLAIMD_CONFIG",
        "RECLAIMD_URL",
        "RECLAIMD_CACHE",
        "RECLAIMD_GUEST_ACCEL",
        "RECLAIMD_UPDATE_GOLDEN",
    }
)


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional TOML file, the environment and explicit overrides.

    Raises ConfigError with one line that names the file, variable or flag and says what is
    wrong, when the file is unreadable or a value is invalid. Warns of ``RECLAIMD_*`` variables
    that are no setting (a misspelt one would otherwise be ignored in silence).
    """
    _warn_unknown_env()
    file_values: dict[str, Any] = {}
    path = config_file or (Path(p) if (p := os.environ.get("RECLAIMD_CONFIG")) else None)
    if path is not None:
        try:
            file_values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"config {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: {exc}") from None
    try:
        env_values = _from_env().model_dump(exclude_unset=True) if _any_env() else {}
    except ValidationError as exc:
        raise ConfigError(_explain(exc, lambda field: env_name(field))) from None
    flags = {k: v for k, v in overrides.items() if v is not None}
    merged = {**file_values, **env_values, **flags}

    def source(field: str) -> str:
        if field in flags:
            return "--" + field.replace("_", "-")
        if field in env_values:
            return env_name(field)
        return f"config {path}: {field}" if path is not None else field

    try:
        # Explicit values outrank the environment in pydantic-settings, so the merge above decides.
        return _from_env(**merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def _from_env(**values: Any) -> Settings:
    """``Settings(**values)``, with pydantic-settings' own error (a list or table variable,
    such as ``RECLAIMD_VM``, that is not JSON) as a ConfigError naming the variable."""
    try:
        return Settings(**values)
    except SettingsError as exc:
        found = re.search(r'field "(\w+)"', str(exc))
        if found is None:
            raise ConfigError(one_line(str(exc), 1000)) from None
        name = env_name(found[1])
        # Variables are read case-insensitively: the one set, whatever its case.
        value = next((v for k, v in os.environ.items() if k.upper() == name), "")
        cause = exc.__cause__
        reason = "not JSON" if isinstance(cause, json.JSONDecodeError) else "cannot be read"
        reason += f" ({cause})" if cause is not None else ""
        if name != env_name("token"):  # never the secret
            reason += f" (got {value[:40]!r})"
        raise ConfigError(one_line(f"{name}: {reason}", 1000)) from None


def _explain(exc: ValidationError, source: Callable[[str], str]) -> str:
    """Pydantic's errors as one line: where each value came from, and what is wrong with it."""
    parts = []
    for error in exc.errors():
        field, *rest = [str(x) for x in error["loc"]] or ["?"]
        where = source(field) + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in rest)
        if error["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown setting")
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        shown = error.get("input")
        # The value, where pydantic's message does not say it, and never the token's (a secret).
        if field != "token" and error["type"] != "value_error" and isinstance(shown, str | int):
            message += f" (got {str(shown)[:40]!r})"
        parts.append(f"{where}: {message}")
    return one_line("; ".join(parts), 1000)


def _warn_unknown_env() -> None:
    known = {env_name(field) for field in Settings.model_fields} | OTHER_ENV
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            log.warning("%s is not a reclaimd setting%s: ignored", name, hint)


def _any_env() -> bool:
    return any(k.startswith(ENV_PREFIX) and k != "RECLAIMD_CONFIG" for k in os.environ)
