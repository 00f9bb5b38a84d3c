#!/usr/bin/env bash
# Creates .venv (if needed) with torch 2.13.0 (CPU) and the test tools, then builds kt_ops in place.
# torch is installed first and the extension is built with --no-build-isolation, so pip never
# resolves torch by itself (which would download a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, ninja, pytest, hypothesis, numpy, safetensors, transformers, peft, trl, accelerate, matplotlib, gguf" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0 numpy ninja pytest hypothesis safetensors setuptools wheel transformers==5.23.0 peft==0.21.2 trl==1.16.0 accelerate==1.15.0 matplotlib gguf==0.19.0
fi
.venv/bin/pip install -q --no-build-isolation --no-deps -e .
