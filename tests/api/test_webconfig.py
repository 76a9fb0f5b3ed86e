"""The web config file (Prometheus exporter-toolkit's format): what it turns on, and every
way it is refused with a message that says which setting is wrong."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
import yaml

from api.webconfig import WebConfig, load_web_config
from daemon.config import ConfigError
from tests.api.certs import Certs, make_certs

# exporter-toolkit's sample hash (htpasswd -nBC 10), $2y$ as htpasswd writes it.
HTPASSWD_HASH = "$2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze"


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


def write(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "web-config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tls_and_users_with_paths_relative_to_the_file(tmp_path: Path, certs: Certs) -> None:
    hashed = bcrypt.hashpw(b"scrape-secret", bcrypt.gensalt(4)).decode()
    path = write(
        tmp_path,
        {
            "tls_server_config": {
                "cert_file": "server.crt",
                "key_file": "server.key",
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": "ca.crt",
                "min_version": "TLS13",
            },
            "basic_auth_users": {"prometheus": hashed, "alice": HTPASSWD_HASH},
        },
    )
    config = load_web_config(path)
    assert config.tls is not None
    assert config.tls.cert_file == certs.server_cert and config.tls.key_file == certs.server_key
    assert config.tls.client_ca_file == certs.ca
    assert config.tls.client_auth == ssl.CERT_REQUIRED
    assert config.tls.min_version == ssl.TLSVersion.TLSv1_3
    context = config.tls.context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert config.users == {"prometheus": hashed.encode(), "alice": HTPASSWD_HASH.encode()}


def test_an_empty_file_turns_nothing_on(tmp_path: Path) -> None:
    path = tmp_path / "web-config.yml"
    path.write_text("# nothing yet\n")
    assert load_web_config(path) == WebConfig()
    assert load_web_config(write(tmp_path, {"basic_auth_users": {}})) == WebConfig()


TLS = {"cert_file": "server.crt", "key_file": "server.key"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"tls_server_config": {**TLS, "cipher_suites": ["X"]}}, "cipher_suites is not supported"),
        ({"tls_server_config": {**TLS, "client_allowed_sans": ["a"]}}, "client_allowed_sans"),
        ({"tls_server_config": {"cert": "PEM", "key": "PEM"}}, "cert is not supported"),
        ({"http_server_config": {"http2": False}}, "http_server_config is not supported"),
        ({"rate_limit": {"burst": 1}}, "rate_limit is not supported"),
        ({"tls_config": {}}, "unknown setting 'tls_config'"),
        ({"tls_server_config": {**TLS, "bogus": 1}}, "unknown setting 'bogus'"),
        ({"tls_server_config": {"cert_file": "server.crt"}}, "cert_file and key_file are both"),
        ({"tls_server_config": {**TLS, "key_file": "missing.key"}}, "cannot use cert_file"),
        ({"tls_server_config": {**TLS, "cert_file": "ca.crt"}}, "cannot use cert_file"),
        ({"tls_server_config": {**TLS, "client_ca_file": "ca.crt"}}, "but client_auth_type is No"),
        (
            {"tls_server_config": {**TLS, "client_auth_type": "RequireAndVerifyClientCert"}},
            "needs client_ca_file",
        ),
        (
            {"tls_server_config": {**TLS, "client_auth_type": "RequestClientCert"}},
            "reclaimd supports",
        ),
        ({"tls_server_config": {**TLS, "min_version": "TLS11"}}, "expected TLS12 or TLS13"),
        (
            {"tls_server_config": {**TLS, "min_version": "TLS13", "max_version": "TLS12"}},
            "min_version is above max_version",
        ),
        ({"tls_server_config": [1]}, "expected a mapping"),
        ({"basic_auth_users": {"alice": "plain-text-password"}}, "expected a bcrypt hash"),
        ({"basic_auth_users": {"alice": "$2y$03$" + "a" * 53}}, "expected a bcrypt hash"),
        ({"basic_auth_users": {"a:b": HTPASSWD_HASH}}, "no ':' allowed"),
        ({"basic_auth_users": {1: HTPASSWD_HASH}}, "is not a user name"),
        ({"basic_auth_users": ["alice"]}, "expected a mapping"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_refused_with_the_setting_named(
    tmp_path: Path, certs: Certs, config: object, message: str
) -> None:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError, match=message) as caught:
        load_web_config(path)
    assert str(path) in str(caught.value)


def test_unreadable_or_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_web_config(tmp_path / "absent.yml")
    broken = tmp_path / "broken.yml"
    broken.write_text("tls_server_config: [unclosed\n")
    with pytest.raises(ConfigError, match="not YAML"):
        load_web_config(broken)


def test_serve_refuses_to_start_with_a_bad_web_config(tmp_path: Path) -> None:
    path = write(tmp_path, {"basic_auth_users": {"alice": "not-a-hash"}})
    serve = [sys.executable, "-m", "daemon.cli", "serve", "--listen", "127.0.0.1:0"]
    serve += ["--vm", f"a=unix:{tmp_path}/a.qmp"]
    done = subprocess.run(
        [*serve, "--journal", str(tmp_path / "j.sqlite3"), "--web-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "basic_auth_users.alice: expected a bcrypt hash" in done.stderr
