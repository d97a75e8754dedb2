"""Experiment 10: prefill softmax exponentials on packed fp16 pairs, and
decode split counts now that the decode loop pipelines deeply.

Prefill (H100, bench of 87cb681): 1x8k 49.9% / 4x2k 40.2% of matmul. Per
128x128 tile the tensor cores need ~2560 clk/SM (10.5 MFLOP) and the fp32
exp2 alone ~1024 clk (16 ex2/clk/SM), serialized with the QK^T wait in
Triton 3.6 (sm_90 TTGIR: warp_group_dot_wait pendings=0 right after QK^T).
Prediction: ex2.approx.f16x2 halves the exp cost: +8-12% on prefill
(1x8k ~55%).

Decode: B=16 8k at 88.2% of copy (96.7% of a plain read of its bytes);
prediction: with 3-deep pipelining fewer splits (2) lose less to the reduce.
"""

from __future__ import annotations

import torch

from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, time_fn, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk

TC = launch.TileConfig


def set_cfg(regime, cfg):
    for k in (("sm90", regime, "16bit", 192, 128), ("sm90", regime, "16bit", "small")):
        launch.TUNED_CONFIGS[k] = cfg
    launch.plan_attention.cache_clear()


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    ceil = measure_ceilings(dev)
    print(ceil, flush=True)
    ws = tk.Workspace.allocate(8192, 32, 128, dev)
    pre = {"base 128x128 w8 st2": TC(128, 128, 8, 2),
           "fast_exp2": TC(128, 128, 8, 2, fast_exp2=True),
           "fast_exp2 st3": TC(128, 128, 8, 3, fast_exp2=True),
           "fast_exp2 bn64 st3": TC(128, 64, 8, 3, fast_exp2=True),
           "base bn64 st3": TC(128, 64, 8, 3)}
    dec = {"bn64 st3": TC(64, 64, 4, 3, 4, preload_tiles=8),
           "bn64 st4": TC(64, 64, 4, 4, 4, preload_tiles=8),
           "bn128 st2": TC(64, 128, 4, 2, 2, preload_tiles=8)}
    runs = [(n, "prefill", pre, [None]) for n in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part")]
    runs += [("decode_b1_32k", "decode", dec, [None, 16, 32, 64]), ("decode_b16_8k", "decode", dec, [None, 2, 4, 8])]
    for name, regime, variants, splits in runs:
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        nbytes, flops = workload(s)
        ref = None
        for vname, cfg in variants.items():
            set_cfg(regime, cfg)
            for ns in splits:
                def fn():
                    tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor,
                                       b.out, scale=192 ** -0.5, max_query_len=c.max_query_len,
                                       max_seq_len=c.max_seq_len, workspace=ws, num_splits=ns)
                try:
                    fn()
                    torch.cuda.synchronize()
                    out = b.out.float().clone()
                    ref = out if ref is None else ref
                    diff = (out - ref).abs().max().item()
                    ms = time_fn(as_graph(fn) or fn)[0]
                    print(f"{name:20s} {vname:20s} splits={ns} {ms * 1e3:8.1f} us  "
                          f"{nbytes / ms / 1e6 / ceil['copy_GBps']:5.1%} copy  "
                          f"{flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:5.1%} matmul  maxdiff {diff:.2e}",
                          flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{name:20s} {vname:20s} splits={ns} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
