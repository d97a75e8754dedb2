#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
# CPU-only machine: Triton kernels run in the Triton interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1 when no GPU is visible). GPU machine: add `-m gpu` for the
# compiled-kernel tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
