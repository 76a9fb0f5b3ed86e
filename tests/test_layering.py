"""The import contract (pyproject.toml, ``[tool.importlinter]``) holds, and it has teeth."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_tree(dest: Path) -> Path:
    for name in ("daemon", "api"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest)
    return dest


def test_the_tree_keeps_the_contract(tmp_path: Path) -> None:
    result = lint_imports(copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_breaks_it(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    diff = tree / "daemon" / "ledger" / "diff.py"
    diff.write_text(diff.read_text() + "\nfrom daemon.qmp import probe  # noqa: E402\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "daemon.ledger.diff -> daemon.qmp.probe" in result.stdout, result.stdout


def test_the_api_reaching_past_the_fleet_breaks_it(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    route = tree / "api" / "routes" / "host.py"
    route.write_text(route.read_text() + "\nfrom daemon.ledger import ranges  # noqa: E402\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "api.routes.host -> daemon.ledger.ranges" in result.stdout, result.stdout


def test_the_model_importing_the_ledger_breaks_the_layers(tmp_path: Path) -> None:
    # Only the layers contract covers the model: the ledger's and the API's are not involved.
    tree = copy_tree(tmp_path)
    costs = tree / "daemon" / "model" / "costs.py"
    costs.write_text(costs.read_text() + "\nfrom daemon.ledger import diff  # noqa: E402\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "Contracts: 2 kept, 1 broken." in result.stdout, result.stdout
    assert "daemon.model.costs -> daemon.ledger.diff" in result.stdout, result.stdout


def test_the_owner_only_files_importing_the_config_breaks_the_layers(tmp_path: Path) -> None:
    # daemon.files sits in the layer below the configuration, as the documented layering has it.
    tree = copy_tree(tmp_path)
    files = tree / "daemon" / "files.py"
    files.write_text(files.read_text() + "\nfrom daemon import config  # noqa: E402\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "daemon.files -> daemon.config" in result.stdout, result.stdout
