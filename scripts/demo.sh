#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: `diffkv demo` (arguments pass through,
# e.g. --backend triton --size small).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/diffkv demo "$@"
