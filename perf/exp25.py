"""Experiments 24-25: a Gluon prefill variant (the product module,
``diffkv/triton/kernels/prefill_gluon.py``) against the kernel of exp23
(prefill_gluon.py at commit 2e401a3; not kept as a copy -- recreate it with
``git show 2e401a3:diffkv/triton/kernels/prefill_gluon.py > /tmp/exp23_prefill_gluon.py``), same
run, timed like ``diffkv bench`` (class API, CUDA-graph replays, L2 flushed
by a read), outputs compared.

exp24 ran it with a persistent product kernel (one program per SM walking a
static snake order of work items; falsified, perf/logs/exp24_h200.log), exp25
with the loop reordered so that ptxas keeps the wgmma pipeline
(perf/logs/exp25_h100.log). perf/NOTES.md has predictions and outcomes.

    python perf/exp25.py /tmp/exp23_prefill_gluon.py product   # any variant files, and/or product
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch

from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, run_backend, time_fn, workload
from diffkv.triton.kernels import attention as tk
from diffkv.triton.kernels import prefill_gluon as v2


def _load(path: str):
    """A prefill_gluon variant from a file (``product``: the product module)."""
    if path == "product":
        return v2
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    dev = torch.device("cuda")
    names = sys.argv[1:] or ["product"]
    mods = [(pathlib.Path(n).stem.replace("_prefill_gluon", ""), _load(n)) for n in names]
    ceil = measure_ceilings(dev)
    print(torch.cuda.get_device_name(), {k: round(v, 1) for k, v in ceil.items()}, flush=True)
    for name in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part", "mixed_2kchunk_62dec"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        _, flops = workload(s)
        outs = {}
        for tag, mod in mods + mods:
            tk._prefill_gluon = mod
            fn = run_backend(s, b, "triton")
            b.out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            outs[tag] = b.out.float().clone()
            replay = as_graph(fn) or fn
            ms, lo, hi = time_fn(replay)
            print(f"{name:22s} {tag:20s} {ms:.4f} ms [{lo:.4f}, {hi:.4f}]  "
                  f"{100 * flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:.1f} % of matmul", flush=True)
        first = outs[mods[0][0]]
        for tag, _ in mods[1:]:
            d = (outs[tag] - first).abs().max().item()
            print(f"{name:22s} max |{tag} - {mods[0][0]}| {d:.3g}, NaN: {bool(outs[tag].isnan().any())}", flush=True)
    tk._prefill_gluon = v2


if __name__ == "__main__":
    main()
