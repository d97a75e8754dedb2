"""One forward of a named bench scenario (any kind: decode, prefill, mixed)
through the product kernels, with the Gluon prefill optionally swapped for a
variant file -- for ncu (replaces perf/ncu_product.py):

    ncu --kernel-name regex:prefill --launch-skip 1 --launch-count 1 --set full \\
        python perf/ncu_prefill.py prefill_4x2k [perf/exp35_persistent_prefill_gluon.py]
"""
import importlib.util
import pathlib
import sys

import torch

from diffkv.bench import SCENARIOS, build_batch, run_backend
from diffkv.triton.kernels import attention as tk

if len(sys.argv) > 2:
    spec = importlib.util.spec_from_file_location(pathlib.Path(sys.argv[2]).stem, sys.argv[2])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tk._prefill_gluon = mod
s = SCENARIOS[sys.argv[1]]
b = build_batch(s, torch.device("cuda"))
fn = run_backend(s, b, "triton")
fn()
torch.cuda.synchronize()
fn()
torch.cuda.synchronize()
