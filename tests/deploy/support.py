"""What the deploy tests share: where things are, YAML loading, the daemon's setting names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from daemon.config import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def setting_env_names() -> set[str]:
    """Every environment variable reclaimd reads: one per Settings field, plus RECLAIMD_CONFIG."""
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields} | {"RECLAIMD_CONFIG"}
