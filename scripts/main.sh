#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: today the MoE benchmark table on the
# DeepSeek-V2-Lite layer shape (benchmarks/bench_moe.py; pass its flags through, e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python benchmarks/bench_moe.py "$@"
