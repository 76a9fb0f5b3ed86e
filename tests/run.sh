#!/usr/bin/env bash
# Sets up .venv with the project and its test extra, then lint, types, the import contract and
# the whole suite
# (unit, property and e2e tests that boot real QEMU guests and a real Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
exec .venv/bin/pytest "$@"
