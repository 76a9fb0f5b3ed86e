"""Reading the committed dashboards: every query a panel, an annotation or a variable runs, with
Grafana's variables substituted as Grafana would for one host and one VM."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deploy.support import DEPLOY

DASHBOARDS = DEPLOY / "grafana" / "dashboards"
# The variables a dashboard query may use: the dashboard's own and Grafana's built-in ones.
KNOWN_VARIABLES = {"cluster", "instance", "vm", "__rate_interval", "__interval", "__range"}


@dataclass(frozen=True)
class Query:
    dashboard: str
    where: str  # "panel 7 'Guest memory' B", "annotation 'QEMU events'", ...
    expr: str
    instant: bool

    def substituted(self, variables: dict[str, str]) -> str:
        return substitute(self.expr, variables)


def substitute(expr: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"unknown variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    model: dict[str, Any] = json.loads(path.read_text())
    return model


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in model["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def queries(path: Path) -> Iterator[Query]:
    model = load(path)
    name = path.name
    for panel in panels(model):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel.get('title')!r} {target.get('refId')}"
            yield Query(name, where, target["expr"], bool(target.get("instant")))
    for annotation in model.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield Query(name, f"annotation {annotation['name']!r}", annotation["expr"], False)


def variable_queries(path: Path) -> Iterator[tuple[str, str]]:
    """(variable name, its ``label_values(...)`` query) for every query variable."""
    for variable in load(path)["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["name"], variable["query"]


def parse_label_values(query: str) -> tuple[str, str]:
    """``label_values(SELECTOR, LABEL)`` -> (SELECTOR, LABEL)."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    if match is None:
        raise ValueError(f"not a label_values query: {query!r}")
    return match.group(1), match.group(2)
