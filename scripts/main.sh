#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: LoRA fine-tuning of a tiny Qwen3-MoE (built from a
# config with random weights, nothing downloaded) whose routed experts run on kt_ops, with `kt-sft
# train` on the shipped example: 16 short question/answer pairs (examples/data/identity.json and
# kt_quiz.json, LLaMA-Factory's registry format) are memorised. The model's greedy answers to the
# training questions are printed before and after fine-tuning, with the share reproduced exactly.
# Another config: scripts/main.sh my.yaml. The kernel benchmarks are in benchmarks/ (benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
echo "main.sh: set-up took $((SECONDS - start)) s"
CONFIG=${1:-examples/tiny_qwen3_moe_sft.yaml}
echo "== before fine-tuning (random base model; LoRA B is zero, so this is the base model):"
.venv/bin/kt-sft score "$CONFIG" --adapter none --show 3
start=$SECONDS
.venv/bin/kt-sft train "$CONFIG"
echo "main.sh: training took $((SECONDS - start)) s"
echo "== after fine-tuning:"
.venv/bin/kt-sft score "$CONFIG" --show 3
