#!/usr/bin/env bash
# Set up (scripts/setup.sh; a no-op when nothing changed) and check the style of the whole tree:
# Python with ruff (configured in pyproject.toml: lint, and formatting), C++ with clang-format
# (.clang-format). Fails on any file a formatter would change; apply them with
# `.venv/bin/ruff format .` and `git ls-files '*.cpp' '*.h' '*.inc' | xargs .venv/bin/clang-format -i`.
# .ci/run runs this before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --no-cache .
.venv/bin/ruff format --no-cache --check .
git ls-files -z '*.cpp' '*.h' '*.inc' '*.cu' | xargs -0 .venv/bin/clang-format --dry-run --Werror
