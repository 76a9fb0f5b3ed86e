from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from daemon.model.cli import parse_size, register


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reclaimd")
    register(p.add_subparsers(required=True))
    return p


def test_parse_size() -> None:
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_simulate_prints_a_table_and_writes_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "sim.png"
    args = parser().parse_args(
        [
            "simulate",
            "--ram",
            "256MiB",
            "--engine",
            "upstream,naive",
            "--workload",
            "memhog",
            "--seconds",
            "20",
            "--plot",
            str(png),
            "--sizes",
            "64MiB,256MiB",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[0] == "engine"
    assert lines[2].split()[0] == "upstream" and lines[3].split()[0] == "naive"
    for path in (png, tmp_path / "sim-scaling.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(
        [
            "simulate",
            "--ram",
            "512MiB",
            "--engine",
            "bitmap",
            "--workload",
            "idle",
            "--seconds",
            "10",
            "--json",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    result = data["results"][0]
    assert result["engine"] == "bitmap"
    assert result["costs"]["pages_reported"] > 0
    assert result["series"][-1][0] == 10.0


def test_unknown_engine_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["simulate", "--engine", "magic", "--no-progress"])
    assert args.func(args) == 2
    assert "unknown engine" in capsys.readouterr().err


def test_simulate_with_costs_times_passes_and_prices_page_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    costs = tmp_path / "costs.json"
    entries = {"report_call": 1e-5, "discard_2m": 6e-6, "discard_4m": 1e-5, "hint_exit": 8e-6}
    entries |= {"refault_2m": 2e-4, "fault_2m": 2e-4, "list_visit": 3e-8}
    costs.write_text(json.dumps({"costs": {k: {"seconds": v} for k, v in entries.items()}}))
    argv = ["simulate", "--ram", "512MiB", "--engine", "boundary", "--workload", "page_fault"]
    argv += ["--seconds", "3", "--cpus", "4", "--json", "--no-progress", "--costs", str(costs)]
    args = parser().parse_args(argv)
    assert args.func(args) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["costs"]["report_seconds"] > 0
    assert result["overhead"]["percent"] < 0
    costs.write_text(json.dumps({"costs": {"warp_drive": {"seconds": 1}}}))
    assert args.func(args) == 2
    assert "unknown costs warp_drive" in capsys.readouterr().err
