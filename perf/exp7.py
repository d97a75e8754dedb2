"""Experiment 7: decode K/V pages through tensor descriptors (TMA) and the
split-KV reduce as a programmatic dependent launch (PDL).

Prediction (perf/NOTES.md, next steps 1): the pointer-gather split kernel keeps
too few bytes in flight (217 registers, 2 programs/SM, DRAM 54% for B=1 32k).
One page per tile through TMA into a 4-8 deep ring needs few registers and
keeps ~40-80 KB in flight per program, so B=1 32k should move from ~52% to
~75-80% of copy, B=16 8k from 82% to ~90%; PDL should hide ~2-3 us of the
reduce's launch.

Each variant is checked against the pointer path's output (max abs diff) and
timed as a CUDA-graph replay with L2 flushed (triton do_bench), like the bench.

The TMA and PDL code paths it drives were reverted after this experiment:
run it at commit 5ffc0f0 (log: perf/logs/exp7_h100.log).
"""

from __future__ import annotations

import sys
import time

import torch
import triton

from diffkv.bench import SCENARIOS, build_batch, measure_ceilings, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk

KEY = ("sm90", "decode", "16bit", 192, 128)
KEY_SMALL = ("sm90", "decode", "16bit", "small")


def set_cfg(cfg: launch.TileConfig) -> None:
    launch.TUNED_CONFIGS[KEY] = cfg
    launch.TUNED_CONFIGS[KEY_SMALL] = cfg
    launch.plan_attention.cache_clear()


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__, flush=True)
    ceil = measure_ceilings(dev)
    bw = ceil["copy_GBps"]
    print(f"copy {bw:.0f} GB/s", flush=True)
    ws = tk.Workspace.allocate(8192, 32, 128, dev)
    base = launch.TUNED_CONFIGS[KEY]
    ptr = launch.TileConfig(64, 128, 4, 3, 2)
    variants = {
        "ptr": ptr,
        "ptr+pdl1": launch.TileConfig(64, 128, 4, 3, 2, pdl=1),
        "ptr+pdl2": launch.TileConfig(64, 128, 4, 3, 2, pdl=2),
        "tma3": launch.TileConfig(64, 128, 4, 3, 2, tma_stages=3),
        "tma4": launch.TileConfig(64, 128, 4, 3, 2, tma_stages=4),
        "tma6": launch.TileConfig(64, 128, 4, 3, 2, tma_stages=6),
        "tma8": launch.TileConfig(64, 128, 4, 3, 2, tma_stages=8),
        "tma4w2": launch.TileConfig(64, 128, 2, 3, 2, tma_stages=4),
        "tma6w2": launch.TileConfig(64, 128, 2, 3, 2, tma_stages=6),
        "tma4+pdl2": launch.TileConfig(64, 128, 4, 3, 2, tma_stages=4, pdl=2),
        "tma6+pdl2": launch.TileConfig(64, 128, 4, 3, 2, tma_stages=6, pdl=2),
        "tma6+pdl2 mt1": launch.TileConfig(64, 128, 4, 3, 1, tma_stages=6, pdl=2),
        "tma6+pdl2 mt4": launch.TileConfig(64, 128, 4, 3, 4, tma_stages=6, pdl=2),
    }
    only = sys.argv[1:]
    names = ["decode_b1_32k", "decode_b16_8k", "decode_b64_4k", "decode_b256_2k", "decode_b64_8k_win128_sinks"]
    for name in names:
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        nbytes, _ = workload(s)
        ref = None
        for vname, cfg in variants.items():
            if only and vname not in only and vname != "ptr":
                continue
            set_cfg(cfg)

            def fn():
                tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out,
                                   scale=192 ** -0.5, sliding_window=s.sliding_window, sinks=b.sinks,
                                   max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws)
            try:
                t0 = time.time()
                b.out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                comp = time.time() - t0
                out = b.out.float().clone()
                if ref is None:
                    ref = out
                diff = (out - ref).abs().max().item()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                t = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")
                plan = tk.plan_for(b.query, b.kv_cache, c.seq_lens, c.block_table_tensor,
                                   max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws,
                                   sliding_window=s.sliding_window)
                print(f"{name:28s} {vname:14s} {t * 1e3:7.1f} us {nbytes / t / 1e6 / bw:5.0%} of copy  "
                      f"splits={plan.num_splits} bn={plan.block_n} st={plan.num_stages} tma={plan.tma} "
                      f"pdl={plan.pdl} maxdiff={diff:.2e} (first call {comp:.1f}s)", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name:28s} {vname:14s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    set_cfg(base)


if __name__ == "__main__":
    main()
