#!/usr/bin/env bash
# Lean CPU install of vllm==0.33.0 into an existing venv, for the vLLM adapter
# tests (tests/test_vllm_adapter.py, `pytest -m vllm`) on a CPU-only machine.
#
# A full `pip install vllm==0.33.0` pulls a CUDA torch 2.14 and ~80 packages
# (several GB). The adapter's tests only need vLLM's attention classes, its
# config objects and its Attention layer, so this script installs:
#   1. vllm itself with --no-deps (the already installed CPU torch is kept);
#   2. the Python modules that those imports need, pinned to versions tested
#      together with vllm 0.33.0 (within vllm's own requirement ranges), also
#      with --no-deps, so nothing can replace torch;
# then checks that torch is unchanged and that the imports work.
# Measured on the 2-core CI machine: 46 s with a cold pip cache (37 s warm),
# +1.16 GB on top of the main test venv (vllm itself is ~0.9 GB of it).
#
# Usage: bash scripts/install_vllm_lean.sh [python]   (default: .venv/bin/python)
# The tests need VLLM_TARGET_DEVICE=cpu when no GPU is visible; the test module
# sets it for its own process, this script only for its import check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
VLLM_VERSION=0.33.0

DEPS=(
  # vllm.config / vllm.envs / logging
  packaging==26.4 regex==2026.11.19 psutil==7.2.2 cbor2==6.3.0 pyzmq==27.3.0 cloudpickle==3.1.3
  msgspec==0.22.0 py-cpuinfo==9.0.0 cachetools==8.0.2 uvloop==0.23.0 pybase64==1.5.1 pillow==13.0.0
  prometheus_client==0.26.0 einops==0.8.2
  # pydantic (core version pinned by pydantic itself)
  pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
  # transformers (vllm.config.model), vllm pins >=5.16.1,<5.21.0
  transformers==5.20.2 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 tqdm==4.70.1 pyyaml==6.0.4
  httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 idna==3.20 truststore==0.10.5 urllib3==2.8.0
  # vllm.connections / entrypoints imported by the config package
  aiohttp==3.14.5 multidict==7.2.1 attrs==26.1.0 yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1
  aiosignal==1.4.0 frozenlist==1.8.0 requests==2.34.2 certifi==2026.10.19.post1 openai==3.57.0
  openai-harmony==0.0.8 sniffio==1.3.1 anyio==4.16.0 fastapi==0.136.3 starlette==1.10.0 annotated-doc==0.0.7
  partial-json-parser==0.2.1.1.post7
  # structured output (vllm.v1.request), pinned by vllm
  xgrammar==0.2.8 apache-tvm-ffi==0.1.11 llguidance==1.7.6
)

start=$(date +%s)
torch_before=$($PY -c "import torch; print(torch.__version__)")
$PY -m pip install -q --no-deps "vllm==${VLLM_VERSION}"
$PY -m pip install -q --no-deps "${DEPS[@]}"
torch_after=$($PY -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
  echo "install_vllm_lean.sh: torch changed from $torch_before to $torch_after; expected it untouched" >&2
  exit 1
fi
VLLM_TARGET_DEVICE=${VLLM_TARGET_DEVICE:-cpu} $PY -c "
import vllm
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.attention.backends.triton_attn_diffkv import TritonAttentionDiffKVBackend
assert vllm.__version__ == '${VLLM_VERSION}', vllm.__version__
VllmConfig()
" >/tmp/diffkv_vllm_check.$$ 2>&1 || {
  echo "install_vllm_lean.sh: vllm ${VLLM_VERSION} does not import after the lean install:" >&2
  tail -5 /tmp/diffkv_vllm_check.$$ >&2
  rm -f /tmp/diffkv_vllm_check.$$
  exit 1
}
rm -f /tmp/diffkv_vllm_check.$$
echo "install_vllm_lean.sh: vllm ${VLLM_VERSION} installed (torch $torch_after kept) in $(( $(date +%s) - start )) s"
