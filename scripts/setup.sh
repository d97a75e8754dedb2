#!/usr/bin/env bash
# Create .venv with diffkv and its test dependencies.
# - A machine whose python3 already has torch + triton (e.g. a GPU box) reuses them
#   (venv with --system-site-packages); otherwise the pinned CPU stack is installed:
#   torch==2.13.0 (CPU wheel), triton==3.6.0, numpy<2.4.
# Usage: bash scripts/setup.sh [extra ...]     (extras: test, plot, vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${*:-test}
extras=${extras// /,}
if [ ! -x .venv/bin/python ]; then
  if $PY -c "import torch, triton" 2>/dev/null; then
    $PY -m venv --system-site-packages .venv
  else
    $PY -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch, triton" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.4"
fi
.venv/bin/pip install -q --no-build-isolation -e ".[${extras}]" 2>/dev/null \
  || .venv/bin/pip install -q -e ".[${extras}]"
.venv/bin/python -c "import torch, triton, diffkv; print(f'diffkv {diffkv.__version__}: torch {torch.__version__}, triton {triton.__version__}, cuda={torch.cuda.is_available()}')"
