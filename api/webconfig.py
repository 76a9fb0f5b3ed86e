"""The web config: TLS and basic authentication for the API, in Prometheus' exporter format.

The file is the ``--web.config.file`` of Prometheus' exporter-toolkit, so one file can serve
reclaimd and the host's other exporters::

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional: clients need a certificate
      client_ca_file: clients-ca.crt                 # ... signed by this CA
      min_version: TLS12                             # TLS12 (default) or TLS13
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hash, e.g. from: htpasswd -nBC 10 "" | tr -d ':\\n'

Without the file (the default) the API is plain HTTP with no read authentication, which is
fine on localhost, the default listen address. Settings of that format that reclaimd does not
implement (inline certificates, cipher suites, curves, SAN allow-lists, HTTP/2, extra headers,
rate limits) are refused by name rather than silently ignored: a security setting that does
nothing is worse than a start that fails. Unlike exporter-toolkit the file is read once, at
start.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.config import ConfigError

TOP_LEVEL = frozenset({"tls_server_config", "basic_auth_users"})
TLS_KEYS = frozenset(
    {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
)
# Known to exporter-toolkit, not implemented here.
UNSUPPORTED = frozenset(
    {
        "http_server_config",
        "rate_limit",
        "cert",
        "key",
        "client_ca",
        "cipher_suites",
        "curve_preferences",
        "prefer_server_cipher_suites",
        "client_allowed_sans",
    }
)
# exporter-toolkit's client_auth_type values that Python's ssl can enforce; the others ask for a
# certificate without verifying it, which Python's ssl does not offer (and is insecure).
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}$")


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: Path
    key_file: Path
    client_auth: ssl.VerifyMode = ssl.CERT_NONE
    client_ca_file: Path | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3

    def context(self) -> ssl.SSLContext:
        """The server's SSL context. Raises ConfigError when a file cannot be used."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version
        ctx.maximum_version = self.max_version
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"web config: cannot use cert_file {self.cert_file} with key_file "
                f"{self.key_file}: {exc}"
            ) from None
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(self.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"web config: cannot use client_ca_file {self.client_ca_file}: {exc}"
                ) from None
        ctx.verify_mode = self.client_auth
        return ctx


@dataclass(frozen=True)
class WebConfig:
    tls: TLSServerConfig | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash


def load_web_config(path: Path) -> WebConfig:
    """Read and check the web config at ``path``. Raises ConfigError saying what is wrong."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"web config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"web config {path}: not YAML: {exc}") from None
    try:
        return parse_web_config(raw if raw is not None else {}, base=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"web config {path}: {exc}") from None


def parse_web_config(raw: Any, *, base: Path) -> WebConfig:
    """The web config from its parsed YAML; relative file names are taken from ``base``."""
    _keys(raw, "the file", TOP_LEVEL)
    tls = raw.get("tls_server_config")
    users = raw.get("basic_auth_users")
    return WebConfig(
        tls=_tls(tls, base) if tls is not None else None,
        users=_users(users) if users is not None else {},
    )


def _keys(raw: Any, where: str, allowed: frozenset[str]) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    for key in raw:
        if key in UNSUPPORTED:
            raise ConfigError(f"{where}: {key} is not supported by reclaimd")
        if key not in allowed:
            raise ConfigError(f"{where}: unknown setting {key!r}")


def _tls(raw: Any, base: Path) -> TLSServerConfig:
    _keys(raw, "tls_server_config", TLS_KEYS)
    files = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"tls_server_config.{key}: expected a file name")
        files[key] = base / value if value else None
    cert, key_file, ca = files["cert_file"], files["key_file"], files["client_ca_file"]
    if cert is None or key_file is None:
        raise ConfigError("tls_server_config: cert_file and key_file are both required")
    auth_name = raw.get("client_auth_type", "NoClientCert")
    if auth_name not in CLIENT_AUTH:
        raise ConfigError(
            f"tls_server_config.client_auth_type {auth_name!r}: reclaimd supports "
            + ", ".join(CLIENT_AUTH)
        )
    client_auth = CLIENT_AUTH[auth_name]
    if ca is not None and client_auth == ssl.CERT_NONE:
        raise ConfigError(
            "tls_server_config: client_ca_file is set but client_auth_type is NoClientCert"
        )
    if ca is None and client_auth != ssl.CERT_NONE:
        raise ConfigError(f"tls_server_config: client_auth_type {auth_name} needs client_ca_file")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = raw.get(key, default)
        if name not in TLS_VERSIONS:
            raise ConfigError(f"tls_server_config.{key} {name!r}: expected TLS12 or TLS13")
        versions[key] = TLS_VERSIONS[name]
    if versions["min_version"] > versions["max_version"]:
        raise ConfigError("tls_server_config: min_version is above max_version")
    config = TLSServerConfig(
        cert_file=cert,
        key_file=key_file,
        client_auth=client_auth,
        client_ca_file=ca,
        min_version=versions["min_version"],
        max_version=versions["max_version"],
    )
    config.context()  # the files must be usable now, not at the first connection
    return config


def _users(raw: Any) -> dict[str, bytes]:
    if not isinstance(raw, dict):
        raise ConfigError("basic_auth_users: expected a mapping of user to bcrypt hash")
    users = {}
    for user, hashed in raw.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise ConfigError(f"basic_auth_users: {user!r} is not a user name (no ':' allowed)")
        match = BCRYPT_HASH.match(hashed) if isinstance(hashed, str) else None
        if match is None or not 4 <= int(match.group(1)) <= 31:
            raise ConfigError(f"basic_auth_users.{user}: expected a bcrypt hash ($2y$10$...)")
        users[user] = hashed.encode()
    return users
