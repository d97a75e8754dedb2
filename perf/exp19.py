"""Experiment 19: small decode KV tiles, many programs per SM.

exp16/17: the paged read floor of decode B=16 x 8k (94.5 % of copy) is
reached with one 16-token page per step, 3 stages, 9 programs per (sequence,
KV head) -- many small programs per SM -- while the decode holds one 64-key
tile x 3 stages (120 KB of shared memory) per SM and reaches 88.3 %.
Prediction: 16- or 32-key tiles with 4-6 stages (40-80 KB, 2-5 programs per
SM) and more splits bring B=16 to >= 90 % without hurting B=64/B=256.

    python perf/exp19.py

Outcome (H100, perf/logs/exp19_h100.log; copy 3016 GB/s): falsified for
whole contexts -- 16-key tiles: B=16 67-80 %, B=64 70-82 %, B=256 84-88 %;
32-key tiles, 5 stages: B=16 86.8 %, B=64 94.2 %, B=256 96.2 % vs 88.7 /
95.1 / 96.8 % for the current 64-key tiles, 3 stages; B=1 within noise
(39.6-41.0 vs 40.2 us). But the windowed decode (window 128 + sinks, B=64 x
8k) gains from 16-key tiles: 25.9 us (4 stages) vs 28.2 us -- the window's
128 keys straddle 144 keys of 16-key tiles instead of up to 191 of 64-key
tiles. Kept for windows <= 256 keys on sm_90 (launch.SHORT_WINDOW).
"""

from __future__ import annotations

import torch

from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, time_fn, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk

TC = launch.TileConfig


def set_cfg(cfg):
    for k in (("sm90", "decode", "16bit", 192, 128), ("sm90", "decode", "16bit", "small")):
        launch.TUNED_CONFIGS[k] = cfg
    launch.plan_attention.cache_clear()


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    ceil = measure_ceilings(dev)
    print({k: round(v, 1) for k, v in ceil.items()}, flush=True)
    ws = tk.Workspace.allocate(8192, 32, 128, dev)
    variants = {"bn64 st3 (current)": TC(64, 64, 4, 3, 4, preload_tiles=8),
                "bn16 st4": TC(64, 16, 4, 4, 4, preload_tiles=16),
                "bn16 st6": TC(64, 16, 4, 6, 4, preload_tiles=16),
                "bn32 st4": TC(64, 32, 4, 4, 4, preload_tiles=16),
                "bn32 st5": TC(64, 32, 4, 5, 4, preload_tiles=16),
                "bn16 st4 w2": TC(64, 16, 2, 4, 4, preload_tiles=16)}
    runs = [("decode_b16_8k", [None, 4, 8, 16]), ("decode_b1_32k", [None, 64]), ("decode_b64_4k", [None]),
            ("decode_b256_2k", [None]), ("decode_b64_8k_win128_sinks", [None])]
    for name, splits in runs:
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        nbytes, _ = workload(s)
        ref = None
        sinks = b.sinks
        for vname, cfg in variants.items():
            set_cfg(cfg)
            for ns in splits:
                def fn():
                    tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor,
                                       b.out, scale=192 ** -0.5, max_query_len=c.max_query_len,
                                       max_seq_len=c.max_seq_len, workspace=ws, num_splits=ns,
                                       sliding_window=s.sliding_window, sinks=sinks)
                try:
                    fn()
                    torch.cuda.synchronize()
                    o = b.out.float().clone()
                    ref = o if ref is None else ref
                    diff = (o - ref).abs().max().item()
                    plan = tk.plan_for(b.query, b.kv_cache, c.seq_lens, c.block_table_tensor,
                                       max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws,
                                       num_splits=ns, sliding_window=s.sliding_window)
                    ms = time_fn(as_graph(fn) or fn)[0]
                    print(f"{name:27s} {vname:20s} splits={plan.num_splits:3d} {ms * 1e3:7.1f} us "
                          f"{nbytes / ms / 1e6 / ceil['copy_GBps']:6.1%} of copy  maxdiff {diff:.1e}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{name:27s} {vname:20s} splits={ns} FAILED {type(e).__name__}: {str(e)[:160]}",
                          flush=True)
        del b


if __name__ == "__main__":
    main()
