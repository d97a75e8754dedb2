"""One forward of a named bench scenario through the product kernels (for ncu)."""
import sys

import torch

from diffkv.bench import SCENARIOS, build_batch, run_backend

s = SCENARIOS[sys.argv[1]]
b = build_batch(s, torch.device("cuda"))
fn = run_backend(s, b, "triton")
fn()
torch.cuda.synchronize()
fn()
torch.cuda.synchronize()
