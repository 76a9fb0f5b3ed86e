"""Configuration: file, environment and flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Address, ConfigError, load_settings, parse_vm_flag


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RECLAIMD_LISTEN", "RECLAIMD_TOKEN", "RECLAIMD_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    settings = load_settings()
    assert settings.listen_host == "127.0.0.1"
    assert settings.token is None


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "reclaimd.toml"
    config.write_text(
        'listen = "127.0.0.1:1111"\npoll_interval = 7\n'
        '[[vm]]\nname = "web1"\naddress = "unix:/run/qemu/web1.qmp"\nmode = "poll"\n'
    )
    monkeypatch.setenv("RECLAIMD_POLL_INTERVAL", "3")
    settings = load_settings(config, listen="127.0.0.1:2222")
    assert settings.listen_port == 2222  # flag beats file
    assert settings.poll_interval == 3  # environment beats file
    assert settings.vm[0].name == "web1" and settings.vm[0].mode == "poll"


def test_bad_inputs_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECLAIMD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("listen = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="token must be at least 16"):
        load_settings(token="short")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_settings(listen="nowhere")
    with pytest.raises(ConfigError, match="expected NAME=ADDRESS"):
        parse_vm_flag("justaname")
    with pytest.raises(ConfigError, match="unix:/path or tcp:host:port"):
        parse_vm_flag("a=/run/x.qmp")


def test_addresses() -> None:
    assert Address.parse("unix:/run/q.sock") == Address("unix", path="/run/q.sock")
    assert Address.parse("tcp:[::1]:4444") == Address("tcp", host="::1", port=4444)
    assert str(Address.parse("tcp:[::1]:4444")) == "tcp:::1:4444"
    assert parse_vm_flag("pve=poll+unix:/var/run/qemu-server/101.qmp").mode == "poll"
    with pytest.raises(ConfigError):
        Address.parse("tcp:host:99999")


def test_libvirt_and_proxmox_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.cli import build_parser

    args = build_parser().parse_args(["serve", "--libvirt", "--proxmox"])
    assert args.libvirt == "qemu:///system" and args.proxmox == Path("/")
    args = build_parser().parse_args(["serve", "--libvirt", "qemu+ssh://h/system"])
    assert args.libvirt == "qemu+ssh://h/system" and args.proxmox is None
    assert load_settings().libvirt is None  # off unless asked for
    monkeypatch.setenv("RECLAIMD_LIBVIRT", "qemu:///session")
    monkeypatch.setenv("RECLAIMD_PROXMOX", "/host")
    settings = load_settings()
    assert settings.libvirt == "qemu:///session" and settings.proxmox == Path("/host")
    assert load_settings(libvirt="test:///default").libvirt == "test:///default"


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("libvirt_nova_metadata", "--libvirt-nova-metadata"),
        ("libvirt_qmp_passthrough", "--libvirt-qmp-passthrough"),
    ],
)
def test_libvirt_switches_are_off_unless_asked_for(
    field: str, flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.cli import build_parser

    env = f"RECLAIMD_{field.upper()}"
    monkeypatch.delenv(env, raising=False)
    monkeypatch.delenv("RECLAIMD_CONFIG", raising=False)
    assert getattr(load_settings(), field) is False

    def from_flags(*argv: str) -> bool:
        args = build_parser().parse_args(["serve", "--libvirt", *argv])
        value: bool = getattr(load_settings(**{field: getattr(args, field)}), field)
        return value

    assert from_flags() is False
    assert from_flags(flag) is True
    config = tmp_path / "r.toml"
    config.write_text(f"{field} = true\n")
    assert getattr(load_settings(config), field) is True
    monkeypatch.setenv(env, "false")
    assert getattr(load_settings(config), field) is False  # the environment beats the file
    assert getattr(load_settings(config, **{field: True}), field) is True  # a flag beats both
    args = build_parser().parse_args(["serve", f"--no-{flag[2:]}"])
    monkeypatch.setenv(env, "true")
    assert getattr(load_settings(**{field: getattr(args, field)}), field) is False
    monkeypatch.setenv(env, "maybe")
    with pytest.raises(ConfigError, match=env):
        load_settings()


def test_reclaim_is_advise_unless_configured_to_act(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECLAIMD_RECLAIM", raising=False)
    assert load_settings().reclaim == "advise"
    config = tmp_path / "r.toml"
    config.write_text(
        'reclaim = "act"\nreclaim_step_bytes = "64M"\n'
        '[[vm]]\nname = "db"\naddress = "unix:/run/db.qmp"\nreclaim = false\n'
    )
    settings = load_settings(config)
    assert settings.reclaim == "act" and settings.reclaim_step_bytes == 64 << 20
    assert settings.vm[0].reclaim is False
    with pytest.raises(ConfigError):
        load_settings(reclaim="yes")
    with pytest.raises(ConfigError):
        load_settings(reclaim_host_target=1.5)
