"""Experiment 12: prefill K/V from a contiguous gathered copy through tensor
descriptors (TMA), to see whether the paged pointer gathers are what holds
the prefill kernel at ~50% of the matmul ceiling.

The pointer path keeps per-thread address tensors for every K/V tile (248
registers at 128x128 tiles, one program per SM) and issues 16-byte cp.async
per thread; descriptor loads need neither. Prediction: if gathers cost the
rate, the TMA variant (plus the gather itself, ~7 us per 21 MB) beats the
paged kernel by >10% on 1x8k; if not, the two are within a few percent and
the limit is the serialized QK^T -> softmax -> PV chain.

Run at the commit that adds it (the KV_DESC kernel path is reverted after).
"""

from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, time_fn, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk

TC = launch.TileConfig


def set_cfg(cfg):
    for k in (("sm90", "prefill", "16bit", 192, 128), ("sm90", "prefill", "16bit", "small")):
        launch.TUNED_CONFIGS[k] = cfg
    launch.plan_attention.cache_clear()


def gather(b, s):
    """Contiguous copy [sum(seq_len), Hkv, D] of each sequence's K/V rows, and the first row of each."""
    c = b.common
    BS = s.block_size
    nb, _, hkv, d = b.kv_cache.shape
    flat = b.kv_cache.view(nb * BS, hkv, d)
    seq_lens = c.seq_lens.tolist()
    rows = []
    for i, L in enumerate(seq_lens):
        j = torch.arange(L, device=flat.device)
        rows.append(c.block_table_tensor[i, j // BS].long() * BS + j % BS)
    idx = torch.cat(rows)
    starts = torch.tensor([0] + list(torch.tensor(seq_lens).cumsum(0)[:-1].tolist()), dtype=torch.int32,
                          device=flat.device)
    return idx, flat, starts


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    ceil = measure_ceilings(dev)
    print(ceil, flush=True)
    cfgs = {"128x128 st2": TC(128, 128, 8, 2), "128x64 st3": TC(128, 64, 8, 3), "128x64 st4": TC(128, 64, 8, 4)}
    for name in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        _, flops = workload(s)
        idx, flat, starts = gather(b, s)
        G = flat.index_select(0, idx).contiguous()
        g2 = G.view(G.shape[0], -1)
        ms_gather = time_fn(as_graph(lambda: torch.index_select(flat, 0, idx, out=G)))[0]
        print(f"{name}: gather of {G.numel() * 2 / 1e6:.1f} MB: {ms_gather * 1e3:.1f} us", flush=True)
        ref = None
        for cname, cfg in cfgs.items():
            set_cfg(cfg)
            plan = tk.plan_for(b.query, b.kv_cache, c.seq_lens, c.block_table_tensor, max_query_len=c.max_query_len,
                               max_seq_len=c.max_seq_len)
            descs = (TensorDescriptor.from_tensor(g2, [plan.block_n, plan.d1]),
                     TensorDescriptor.from_tensor(g2, [plan.block_n, plan.d2]),
                     TensorDescriptor.from_tensor(g2, [plan.block_n, 128]), starts)
            for mode in ("paged", "tma"):
                def fn():
                    tk._launch(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out, plan,
                               None, scale=192 ** -0.5, sliding_window=None, softcap=None, alibi_slopes=None,
                               use_alibi_sqrt=False, sinks=None, q_len_range=(0, 2**31 - 1),
                               kv_desc=descs if mode == "tma" else None)
                try:
                    fn()
                    torch.cuda.synchronize()
                    out = b.out.float().clone()
                    ref = out if ref is None else ref
                    ms = time_fn(as_graph(fn) or fn)[0]
                    print(f"{name:20s} {cname:12s} {mode:5s} {ms * 1e3:8.1f} us "
                          f"{flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:5.1%} matmul "
                          f"(with gather {flops / (ms + (ms_gather if mode == 'tma' else 0)) / 1e9 / ceil['bf16_matmul_TFLOPs']:5.1%}) "
                          f"maxdiff {(out - ref).abs().max().item():.2e}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{name:20s} {cname:12s} {mode:5s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
