"""Experiment 14: why the demo's eager functional step is slower on the H100
(0.85 / 0.95 ms/step) than the H200 run of the release before the gathered
prefill path (0.38 / 0.68 ms). Times the demo batch (layer "full") through
(a) the functional API, (b) the functional API with the gather path off,
(c) the class API (builder with a preallocated gather buffer), eagerly and
as a CUDA-graph replay for (c); prints the top CUDA kernels of (a).

    python perf/exp14.py
"""

from __future__ import annotations

import time

import torch

import diffkv
from diffkv.demo import LAYERS, SIZES
from diffkv.testing import BatchSpec, make_batch
from diffkv.triton.kernels import attention as tk
from tests.triton_common import build_metadata


def eager_ms(fn, reps=30):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main():
    seqs, H, Hkv = SIZES["large"]
    spec = BatchSpec(seqs=seqs, num_heads=H, num_kv_heads=Hkv, head_size=192, head_size_v=128, block_size=16,
                     dtype=torch.bfloat16, padding_rows=3, seed=1)
    b = make_batch(spec, LAYERS["full"], device="cuda")
    q_lens = [s.q_len for s in seqs]
    print(torch.cuda.get_device_name(), "q_lens max", max(q_lens), "seq_len max", max(s.seq_len for s in seqs),
          "prefill seqs", sum(q > 8 for q in q_lens))

    def functional():
        diffkv.paged_attention(b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table, out=b.out,
                               backend="triton", validate=False, **b.attention_kwargs())

    print(f"(a) functional, eager             {eager_ms(functional):.3f} ms")
    real = tk._can_gather
    tk._can_gather = lambda *a, **k: False
    print(f"(b) functional, no gather, eager  {eager_ms(functional):.3f} ms")
    tk._can_gather = real

    from diffkv.triton.backend import TritonBackend
    impl = TritonBackend.get_impl_cls()(**b.impl_kwargs())
    _, md = build_metadata(b, TritonBackend)
    out = b.fresh_out()

    def cls_api():
        impl.forward(None, b.query, b.key, b.value, b.kv_cache, md, out)

    print(f"(c) class API, eager              {eager_ms(cls_api):.3f} ms")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        cls_api()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        cls_api()
    print(f"(c) class API, graph replay       {eager_ms(g.replay):.3f} ms")

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            functional()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
