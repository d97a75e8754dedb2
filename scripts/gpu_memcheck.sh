#!/usr/bin/env bash
# compute-sanitizer memcheck of a representative subset of the Triton kernels
# (scripts/gpu_memcheck.py). Needs a CUDA GPU and compute-sanitizer on PATH
# (or under /usr/local/cuda/bin). The PyTorch caching allocator is disabled so
# that every tensor is its own allocation and an out-of-bounds access cannot
# hide inside a neighbour's memory. Exit status: non-zero on any reported
# error or wrong result.
#   scripts/gpu_memcheck.sh             the subset (must report 0 errors)
#   scripts/gpu_memcheck.sh --selftest  a planted out-of-bounds write (must be reported)
set -euo pipefail
cd "$(dirname "$0")/.."
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
PY=${PYTHON:-python3}
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--selftest" ]; then
  rc=0
  "$SAN" --tool memcheck --leak-check no --error-exitcode 99 --print-limit 5 "$PY" scripts/gpu_memcheck.py --plant-oob || rc=$?
  if [ "$rc" = 99 ]; then echo "memcheck selftest: planted out-of-bounds write detected"; exit 0; fi
  echo "memcheck selftest FAILED: the planted out-of-bounds write was not reported (exit $rc)"; exit 1
fi
exec "$SAN" --tool memcheck --leak-check no --error-exitcode 99 --print-limit 20 \
  "$PY" scripts/gpu_memcheck.py
