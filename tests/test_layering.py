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


def broken_by(tmp_path: Path, module: str, line: str) -> str:
    """lint-imports' report on a copy of the tree with ``line`` added to ``module`` (a path
    in the tree), which must break the contract."""
    tree = copy_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    return result.stdout


def test_the_tree_keeps_the_contract(tmp_path: Path) -> None:
    result = lint_imports(copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_breaks_it(tmp_path: Path) -> None:
    report = broken_by(tmp_path, "daemon/ledger/diff.py", "from daemon.qmp import probe")
    assert "daemon.ledger.diff -> daemon.qmp.probe" in report, report


def test_the_api_reaching_past_the_fleet_breaks_it(tmp_path: Path) -> None:
    report = broken_by(tmp_path, "api/routes/host.py", "from daemon.ledger import ranges")
    assert "api.routes.host -> daemon.ledger.ranges" in report, report


def test_the_model_importing_the_ledger_breaks_the_layers(tmp_path: Path) -> None:
    # Only the layers contract covers the model: the ledger's and the API's are not involved.
    report = broken_by(tmp_path, "daemon/model/costs.py", "from daemon.ledger import diff")
    assert "Contracts: 2 kept, 1 broken." in report, report
    assert "daemon.model.costs -> daemon.ledger.diff" in report, report


def test_the_owner_only_files_importing_the_config_breaks_the_layers(tmp_path: Path) -> None:
    # daemon.files sits in the layer below the configuration, as the documented layering has it.
    report = broken_by(tmp_path, "daemon/files.py", "from daemon import config")
    assert "daemon.files -> daemon.config" in report, report
