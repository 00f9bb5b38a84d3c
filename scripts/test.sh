#!/usr/bin/env bash
# Set up (scripts/setup.sh; a no-op when nothing changed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
echo "test.sh: set-up took $((SECONDS - start)) s"
exec .venv/bin/python -m pytest -q "$@"
