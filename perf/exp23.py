"""Experiment 23: the Gluon prefill kernel in the product path vs the Triton
kernel (gathered copy), same run, timed like ``diffkv bench`` (class API,
CUDA-graph replays, L2 flushed by a read).

Prediction (from exp22, where the kernel read a pre-gathered copy): 1x8k
1.43 -> ~1.30 ms, 4x2k 0.44 -> ~0.42 ms, the 2k chunk ~10 % faster; reading
pages by TMA boxes straight from the cache (no gather launch) costs nothing
measurable.

    python perf/exp23.py
"""

from __future__ import annotations

import torch

from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, run_backend, time_fn, workload
from diffkv.triton.kernels import attention as tk


def main():
    dev = torch.device("cuda")
    ceil = measure_ceilings(dev)
    print(torch.cuda.get_device_name(), {k: round(v, 1) for k, v in ceil.items()}, flush=True)
    for name in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part", "mixed_2kchunk_62dec"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        _, flops = workload(s)
        outs = {}
        for use_gluon in (False, True, False, True):
            tk._USE_GLUON = use_gluon
            fn = run_backend(s, b, "triton")
            b.out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            outs[use_gluon] = b.out.float().clone()
            replay = as_graph(fn) or fn
            ms, lo, hi = time_fn(replay)
            tag = "gluon " if use_gluon else "triton"
            print(f"{name:22s} {tag} {ms:.4f} ms [{lo:.4f}, {hi:.4f}]  "
                  f"{100 * flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:.1f} % of matmul", flush=True)
        d = (outs[True] - outs[False]).abs().max().item()
        print(f"{name:22s} max |gluon - triton| {d:.3g}, NaN: {bool(outs[True].isnan().any())}", flush=True)
    tk._USE_GLUON = True


if __name__ == "__main__":
    main()
