#!/usr/bin/env bash
# Creates .venv (if needed) with torch 2.13.0 (CPU) and the test tools, then builds kt_ops's extension
# in place. Repeated runs are cheap: pip runs only when the pinned requirement list below changed
# (stamp in .venv), the editable install (console script kt-sft) only when setup.py/pyproject.toml
# changed, and the extension is an incremental ninja build in build/ that recompiles only the C++
# files whose sources or included headers changed, on all cores.
# torch is installed first and the extension is built with --no-build-isolation, so pip never
# resolves torch by itself (which would download a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REQUIREMENTS="torch==2.13.0 numpy ninja pytest hypothesis safetensors pyyaml setuptools wheel transformers==5.23.0 \
peft==0.21.2 trl==1.16.0 accelerate==1.15.0 matplotlib gguf==0.19.0 ruff==0.17.6 \
clang-format==19.1.7"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.kt_ops_requirements
rebuild=0
if [ "$(cat "$stamp" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  # shellcheck disable=SC2086
  .venv/bin/pip install -q $REQUIREMENTS
  echo "$REQUIREMENTS" > "$stamp"
  rebuild=1  # torch may have changed: the extension must be rebuilt against it
fi
# The editable install only registers the package and the kt-sft script; KT_OPS_NO_EXT keeps pip from
# compiling the extension in a throwaway directory (the in-place build below does it, incrementally).
stamp=.venv/.kt_ops_editable
digest=$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  KT_OPS_NO_EXT=1 .venv/bin/pip install -q --no-build-isolation --no-deps -e .
  echo "$digest" > "$stamp"
fi
# Skip even starting Python when the library is newer than every C++ source, header and setup.py.
so=$(ls kt_ops/_C*.so 2>/dev/null | head -n 1 || true)  # none yet on a fresh clone (pipefail)
if [ "$rebuild" = 1 ] || [ -z "$so" ] || [ -n "$(find kt_ops_csrc setup.py -newer "$so" -print -quit)" ]; then
  MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python setup.py -q build_ext --inplace
fi
