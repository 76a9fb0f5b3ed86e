"""The deploy tests' record of the checks this machine cannot run, printed at the end of the run
(besides pytest's own skip summary), so that nothing is skipped silently."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

_not_run: list[str] = []


@pytest.fixture
def not_run() -> Callable[[str], None]:
    """``not_run(reason)``: skip this test, and list the reason again at the end of the run."""

    def skip(reason: str) -> None:
        _not_run.append(reason)
        pytest.skip(reason)

    return skip


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _not_run:
        terminalreporter.section("deploy checks NOT RUN on this machine")
        for reason in _not_run:
            terminalreporter.write_line(f"NOT RUN: {reason}")
