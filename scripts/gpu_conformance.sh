#!/usr/bin/env bash
# The conformance suite's quick profile on CUDA for the Triton backend -- the
# same checks as tests/test_conformance.py::test_triton_backend_passes_the_quick_profile_on_gpu
# (report passes, cuda_graph passes) -- spread over JOBS processes, because on a
# fresh machine most of its time is Triton compiling kernel variants on one CPU
# core (~500 s in one process on the H100 machine).
#   JOBS=6 OUT=out bash scripts/gpu_conformance.sh
# Exit status: non-zero if any check failed or a process did not finish.
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-6}; OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mapfile -t ids < <("$PY" -m conformance --backend triton --device cuda --list | awk '{print $1}')
[ "${#ids[@]}" -gt 0 ] || { echo "no checks listed"; exit 2; }
pids=()
for ((j = 0; j < JOBS; j++)); do
  group=""
  for ((i = j; i < ${#ids[@]}; i += JOBS)); do group+="${group:+,}${ids[$i]}"; done
  [ -n "$group" ] || continue
  "$PY" -m conformance --backend triton --device cuda --checks "$group" --report "$OUT/conformance_cuda_$j.json" \
    > "$OUT/conformance_cuda_$j.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
"$PY" - "$OUT" "${#ids[@]}" <<'PY' || rc=1
import glob, json, sys
out, n = sys.argv[1], int(sys.argv[2])
results = [r for f in sorted(glob.glob(f"{out}/conformance_cuda_*.json")) for r in json.load(open(f))["results"]]
by_status = {}
for r in results:
    by_status.setdefault(r["status"], []).append(r["id"])
print(f"{len(results)} of {n} checks reported: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(by_status.items())))
fails = by_status.get("fail", [])
graph = [r["status"] for r in results if r["id"] == "cuda_graph"]
print("failed:", fails or "none", "| cuda_graph:", graph)
sys.exit(0 if len(results) == n and not fails and graph == ["pass"] else 1)
PY
echo "conformance (quick, cuda, $JOBS processes): $([ $rc = 0 ] && echo PASSED || echo FAILED)"
exit $rc
