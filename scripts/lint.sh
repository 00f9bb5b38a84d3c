#!/usr/bin/env bash
# Set up (scripts/setup.sh; a no-op when nothing changed) and check the Python style of the whole
# tree with ruff (configured in pyproject.toml): lint, and formatting (fails on any file
# `ruff format` would change; run `.venv/bin/ruff format .` to apply it). .ci/run runs this before
# the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --no-cache .
.venv/bin/ruff format --no-cache --check .
