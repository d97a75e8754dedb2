"""Experiment 11: fold the score scale into the exponent's FMA on interior
prefill tiles (max of raw scores x qk_scale, then exp2(x * s - m)): one
floating-point op less per score on the CUDA cores, which the softmax of a
128x128 tile runs serialized with the tensor cores in Triton 3.6.

Prediction: +2-5% on prefill 1x8k / 4x2k; decode unchanged (masked tiles).
"""

from __future__ import annotations

import torch

from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, time_fn, workload
from diffkv.triton.kernels import attention as tk


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    ceil = measure_ceilings(dev)
    print(ceil, flush=True)
    for name in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        _, flops = workload(s)
        ref = None
        for fold in (False, True, False, True):
            tk._FOLD_SCALE = fold

            def fn():
                tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor,
                                   b.out, scale=192 ** -0.5, max_query_len=c.max_query_len,
                                   max_seq_len=c.max_seq_len)
            fn()
            torch.cuda.synchronize()
            out = b.out.float().clone()
            ref = out if ref is None else ref
            ms = time_fn(as_graph(fn) or fn)[0]
            print(f"{name:20s} fold={fold!s:5s} {ms * 1e3:8.1f} us  "
                  f"{flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:5.1%} matmul  maxdiff {(out - ref).abs().max().item():.2e}",
                  flush=True)
    tk._FOLD_SCALE = True


if __name__ == "__main__":
    main()
