#!/usr/bin/env bash
# Everything the GPU machine is asked to run before kernel work is called done, in one go:
# benchmark, pytest -m gpu, demo, conformance report on CUDA, compute-sanitizer memcheck.
# Logs and reports go to ${OUT:-out}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m diffkv.cli bench --json "$OUT/bench.json" --plot "$OUT/bench.png" 2> "$OUT/bench.err" | tee "$OUT/bench.log"
# conformance first, over several processes: it compiles most kernel variants, which the
# gpu-marked conformance test in pytest then finds in Triton's cache
JOBS=8 OUT="$OUT" timeout 400 bash scripts/gpu_conformance.sh | tail -3
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n 12"
timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider $XDIST tests/ > "$OUT/pytest_gpu.log" 2>&1; echo "pytest -m gpu exit $?"
tail -3 "$OUT/pytest_gpu.log"
python3 -m diffkv.cli demo 2>&1 | tee "$OUT/demo.log"
timeout 150 bash scripts/gpu_memcheck.sh > "$OUT/memcheck.log" 2>&1; echo "memcheck exit $?"
tail -3 "$OUT/memcheck.log"
