#!/usr/bin/env bash
# compute-sanitizer memcheck of a representative subset of the Triton kernels
# (scripts/gpu_memcheck.py). Needs a CUDA GPU and compute-sanitizer on PATH
# (or under /usr/local/cuda/bin). The PyTorch caching allocator is disabled so
# that every tensor is its own allocation and an out-of-bounds access cannot
# hide inside a neighbour's memory. Exit status: non-zero on any reported
# error or wrong result.
set -euo pipefail
cd "$(dirname "$0")/.."
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
PY=${PYTHON:-python3}
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$SAN" --tool memcheck --leak-check no --error-exitcode 99 --print-limit 20 \
  "$PY" scripts/gpu_memcheck.py
