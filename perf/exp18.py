"""Experiment 18: fused split reduce (the split that finishes last combines
the partials in the attention kernel) against the separate reduce kernel.

exp17 (H100): decode B=16 x 8k spends 119.8 us in the attention kernel and
2.5 us in the reduce kernel, 126.0 us as a graph replay; a paged read of the
same bytes takes 116.7 us. B=1 x 32k: 33.6 + 2.4 us, 39.7 us replayed,
paged read 33.8 us. Prediction: fusing removes the reduce launch and the gap
before it: B=16 ~122 us (>= 90 % of copy), B=1 a smaller gain (64 splits: one
SM per KV head reads 256 KB of partials at the end).

    git apply perf/exp18_fused_reduce.patch && python perf/exp18.py

Outcome (H100, perf/logs/exp18_h100.log): no gain. B=16 125.7 us separate
vs 125.8 us fused (4 splits); B=1 39.7 us separate vs 46.2 us fused (64
splits: the last program per KV head reads 256 KB of partials alone), 16
and 32 splits also slower fused. The reduce kernel is not what B=16 loses:
the last split must wait for the others and read their partials in either
form. Reverted; the kernel change is kept as perf/exp18_fused_reduce.patch
(it needs that patch to run).
"""

from __future__ import annotations

import torch

from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, time_fn, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    ceil = measure_ceilings(dev)
    print({k: round(v, 1) for k, v in ceil.items()}, flush=True)
    ws = tk.Workspace.allocate(8192, 32, 128, dev)
    runs = [("decode_b1_32k", [None, 16, 32]), ("decode_b16_8k", [None, 8]), ("mixed.decode_part", [None]),
            ("decode_b64_4k", [None])]
    for name, splits in runs:
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        nbytes, _ = workload(s)
        for ns in splits:
            ref = None
            for mode, limit in (("separate reduce", 0), ("fused reduce", 64)):
                launch.FUSED_REDUCE_MAX_SPLITS = limit
                launch.plan_attention.cache_clear()

                def fn():
                    tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor,
                                       b.out, scale=192 ** -0.5, max_query_len=c.max_query_len,
                                       max_seq_len=c.max_seq_len, workspace=ws, num_splits=ns)
                plan = tk.plan_for(b.query, b.kv_cache, c.seq_lens, c.block_table_tensor,
                                   max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws,
                                   num_splits=ns)
                b.out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                o = b.out.float().clone()
                ref = o if ref is None else ref
                diff = (o - ref).abs().max().item()
                ms = time_fn(as_graph(fn) or fn)[0]
                print(f"{name:18s} splits={plan.num_splits:3d} {mode:16s} {ms * 1e3:7.1f} us "
                      f"{nbytes / ms / 1e6 / ceil['copy_GBps']:6.1%} of copy  maxdiff vs separate {diff:.1e}  "
                      f"nan {bool(torch.isnan(o).any())}  counters clean {int(ws.split_counter.abs().sum()) == 0}",
                      flush=True)
        del b


if __name__ == "__main__":
    main()
