"""Experiment 15: host (CPU) time of one class-API ``impl.forward`` on the
demo batch -- what a serving engine pays per layer when attention runs
outside a CUDA graph (vLLM's piecewise graphs). cProfile of 200 calls
without synchronisation, after warm-up; prints per-call host time and the
top functions.

    python perf/exp15.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

from diffkv.demo import LAYERS, SIZES
from diffkv.testing import BatchSpec, make_batch
from diffkv.triton.backend import TritonBackend
from tests.triton_common import build_metadata


def main():
    seqs, H, Hkv = SIZES["large"]
    for name, picked in (("demo mixed batch", seqs), ("decode only (the 28 decodes)", [s for s in seqs if s.q_len == 1])):
        spec = BatchSpec(seqs=tuple(picked), num_heads=H, num_kv_heads=Hkv, head_size=192, head_size_v=128,
                         block_size=16, dtype=torch.bfloat16, padding_rows=3, seed=1)
        b = make_batch(spec, LAYERS["full"], device="cuda")
        impl = TritonBackend.get_impl_cls()(**b.impl_kwargs())
        _, md = build_metadata(b, TritonBackend)
        out = b.fresh_out()

        def fwd():
            impl.forward(None, b.query, b.key, b.value, b.kv_cache, md, out)

        for _ in range(5):
            fwd()
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            fwd()
        host = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t0) / n
        print(f"{torch.cuda.get_device_name()} {name}: host {host * 1e3:.3f} ms/forward, "
              f"host+drain {gpu * 1e3:.3f} ms/forward")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            fwd()
        pr.disable()
        torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
