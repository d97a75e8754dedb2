"""Experiment 13: tiles of the gathered (descriptor) prefill path.

With K/V through tensor descriptors no address registers are needed, so a
64-row program (one warpgroup) may fit twice per SM; two resident programs
let one's softmax overlap the other's tensor-core work (the overlap Triton
3.6 does not schedule inside one program). Prediction: 64-row tiles at two
programs per SM beat 128x64 (one per SM) on 4x2k (49% of matmul), where
diagonal tiles weigh more.
"""

from __future__ import annotations

import torch

from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, time_fn, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk

TC = launch.TileConfig


def set_cfg(cfg):
    for k in (("sm90", "prefill", "16bit", 192, 128), ("sm90", "prefill", "16bit", "small")):
        launch.TUNED_CONFIGS[k] = cfg
    launch.plan_attention.cache_clear()


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    ceil = measure_ceilings(dev)
    print(ceil, flush=True)
    ws = tk.Workspace.allocate(64, 32, 128, dev, kv_rows=32768, kv_row_width=4 * 320, kv_dtype=torch.bfloat16)
    cfgs = {
        "128x64 w8 st3": TC(128, 128, 8, 2, gathered_block_n=64, gathered_stages=3),
        "128x64 w8 st4": TC(128, 128, 8, 2, gathered_block_n=64, gathered_stages=4),
        "128x32 w8 st4": TC(128, 128, 8, 2, gathered_block_n=32, gathered_stages=4),
        "64x64 w4 st2": TC(64, 128, 4, 2, gathered_block_n=64, gathered_stages=2),
        "64x64 w4 st3": TC(64, 128, 4, 2, gathered_block_n=64, gathered_stages=3),
        "64x128 w4 st2": TC(64, 128, 4, 2, gathered_block_n=128, gathered_stages=2),
        "64x32 w4 st4": TC(64, 128, 4, 2, gathered_block_n=32, gathered_stages=4),
    }
    for name in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        _, flops = workload(s)
        ref = None
        for cname, cfg in cfgs.items():
            set_cfg(cfg)

            def fn():
                tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out,
                                   scale=192 ** -0.5, max_query_len=c.max_query_len, max_seq_len=c.max_seq_len,
                                   workspace=ws)
            try:
                fn()
                torch.cuda.synchronize()
                out = b.out.float().clone()
                ref = out if ref is None else ref
                ms = time_fn(as_graph(fn) or fn)[0]
                print(f"{name:20s} {cname:14s} {ms * 1e3:8.1f} us {flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:5.1%} "
                      f"matmul maxdiff {(out - ref).abs().max().item():.2e}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name:20s} {cname:14s} FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)


if __name__ == "__main__":
    main()
