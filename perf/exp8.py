"""Experiment 8: block-table read-ahead so the decode KV loop pipelines deeply.

Measured offline (perf/compile_sm90.py, sm_90 TTGIR): with the block-table
load inside the KV loop, Triton 3.6's pipeliner keeps ONE buffer per K/V tile
whatever num_stages is (``memdesc<1x128x128xbf16>``, ``async_wait num=0`` at
the loop top): one tile in flight per program. Reading the entries of 8 tiles
ahead (``PRELOAD_TILES``) removes the dependent load from the loop; then the
buffers are ``2x128x128`` (bn 128, 3 stages) or ``3x64x128`` (bn 64, 4
stages).

Prediction: decode B=1 32k and B=16 8k gain most (short loops, latency
bound): from 57% / 84% of copy (H100, exp7) towards ~70% / 90%; B=64 / B=256
(already 93-97%) stay or gain a little.
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
TC = launch.TileConfig


def set_cfg(cfg: launch.TileConfig) -> None:
    launch.TUNED_CONFIGS[KEY] = cfg
    launch.TUNED_CONFIGS[KEY_SMALL] = cfg
    launch.plan_attention.cache_clear()


VARIANTS = {
    "old bn128 st3": TC(64, 128, 4, 3, 2, preload_tiles=0),
    "bn128 st3 p8": TC(64, 128, 4, 3, 2, preload_tiles=8),
    "bn128 st2 p8": TC(64, 128, 4, 2, 2, preload_tiles=8),
    "bn64 st3 p8": TC(64, 64, 4, 3, 4, preload_tiles=8),
    "bn64 st4 p8": TC(64, 64, 4, 4, 4, preload_tiles=8),
    "bn64 st3 p16": TC(64, 64, 4, 3, 4, preload_tiles=16),
    "bn64 st2 p8": TC(64, 64, 4, 2, 4, preload_tiles=8),
    "bn32 st4 p16": TC(64, 32, 4, 4, 8, preload_tiles=16),
    "bn32 st6 p16": TC(64, 32, 4, 6, 8, preload_tiles=16),
    "bn64 st3 p8 w8": TC(64, 64, 8, 3, 4, preload_tiles=8),
    "bn128 st3 p8 mt1": TC(64, 128, 4, 3, 1, preload_tiles=8),
    "bn64 st3 p8 mt2": TC(64, 64, 4, 3, 2, preload_tiles=8),
}


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__, flush=True)
    ceil = measure_ceilings(dev)
    bw = ceil["copy_GBps"]
    print(f"copy {bw:.0f} GB/s", flush=True)
    ws = tk.Workspace.allocate(8192, 32, 128, dev)
    base = launch.TUNED_CONFIGS[KEY]
    variants = VARIANTS
    only = sys.argv[1:]
    names = ["decode_b1_32k", "decode_b16_8k", "decode_b64_4k", "decode_b256_2k", "decode_b64_8k_win128_sinks",
             "mixed.decode_part"]
    for name in names:
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        nbytes, _ = workload(s)
        ref = None
        for vname, cfg in variants.items():
            if only and vname not in only and vname != "old bn128 st3":
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
                      f"splits={plan.num_splits} bn={plan.block_n} st={plan.num_stages} "
                      f"pre={plan.preload_tiles} maxdiff={diff:.2e} (first call {comp:.1f}s)", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name:28s} {vname:14s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    set_cfg(base)


if __name__ == "__main__":
    main()
