#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: LoRA fine-tuning of a tiny Qwen3-MoE (built from a
# config, nothing downloaded) whose routed experts run on kt_ops, with `kt-sft train` on the shipped
# example, then a greedy answer from the trained adapter. Another config: scripts/main.sh my.yaml
# The kernel benchmark table is benchmarks/bench_moe.py (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CONFIG=${1:-examples/tiny_qwen3_moe_sft.yaml}
.venv/bin/kt-sft train "$CONFIG"
.venv/bin/kt-sft generate "$CONFIG" --prompt "Name a primary color." --max-new-tokens 24
