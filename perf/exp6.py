"""Experiment 6: decode with 2 warps per program (more programs per SM: ncu
showed 217 registers/thread, 2 blocks/SM, 12.5% occupancy at 4 warps)."""

from __future__ import annotations

import torch
import triton

from diffkv.bench import SCENARIOS, build_batch, measure_ceilings, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk

if __name__ == "__main__":
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name())
    bw = measure_ceilings(dev)["copy_GBps"]
    print(f"copy {bw:.0f} GB/s", flush=True)
    ws = tk.Workspace.allocate(4096, 32, 128, dev)
    key = ("sm90", "decode", "16bit", 192, 128)
    base = launch.TUNED_CONFIGS[key]
    for name in ("decode_b1_32k", "decode_b16_8k", "decode_b64_4k", "decode_b64_8k_win128_sinks"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        nbytes, _ = workload(s)
        for bn, w, st in ((128, 4, 3), (128, 2, 3), (64, 2, 3), (64, 2, 4), (32, 2, 3), (128, 2, 2), (64, 4, 3)):
            launch.TUNED_CONFIGS[key] = launch.TileConfig(64, bn, w, st, 2)
            launch.WINDOW_DECODE_BLOCK_N = bn
            launch.plan_attention.cache_clear()

            def fn():
                tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out,
                                   scale=192 ** -0.5, sliding_window=s.sliding_window, sinks=b.sinks,
                                   max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws)
            fn()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            t = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")
            print(f"{name} bn={bn} w={w} st={st}: {t * 1e3:.1f} us {nbytes / t / 1e6 / bw:.0%}", flush=True)
    launch.TUNED_CONFIGS[key] = base
