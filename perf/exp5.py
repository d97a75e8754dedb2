"""Experiment 5 (product kernels, prefill): GQA packing on/off, stages, tile
sizes; the mixed batch with the decode tiles sized to its decodes."""

from __future__ import annotations

import torch
import triton

from diffkv.bench import SCENARIOS, build_batch, measure_ceilings, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="median")


def call(s, b, **kw):
    c = b.common
    return lambda: tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out,
                                      scale=192 ** -0.5, sliding_window=s.sliding_window, sinks=b.sinks,
                                      max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, **kw)


if __name__ == "__main__":
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name())
    ceil = measure_ceilings(dev)
    tf = ceil["bf16_matmul_TFLOPs"]
    print(ceil, flush=True)
    key = ("sm90", "prefill", "16bit", 192, 128)
    base = launch.TUNED_CONFIGS[key]
    for name in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        _, flops = workload(s)
        for bm, bn, w, st, g in ((128, 128, 8, 2, 128), (128, 128, 8, 2, 1), (128, 128, 8, 3, 1), (128, 64, 8, 3, 1),
                                 (128, 128, 8, 3, 128), (128, 64, 8, 2, 128), (64, 128, 4, 2, 1), (128, 128, 4, 2, 1)):
            launch.TUNED_CONFIGS[key] = launch.TileConfig(bm, bn, w, st, 4, g)
            launch.plan_attention.cache_clear()
            try:
                t = bench(call(s, b))
            except Exception as e:  # noqa: BLE001
                print("fail", name, bm, bn, w, st, g, str(e)[:100], flush=True)
                continue
            print(f"{name} BM={bm} BN={bn} w={w} st={st} g_tile<={g}: {t:.3f} ms {flops / t / 1e9:.0f} TFLOP/s "
                  f"({flops / t / 1e9 / tf:.0%})", flush=True)
    launch.TUNED_CONFIGS[key] = base
    launch.plan_attention.cache_clear()
    s = SCENARIOS["mixed_2kchunk_62dec"]
    b = build_batch(s, dev)
    print(f"mixed one launch {bench(call(s, b)):.3f} ms; two launches "
          f"{bench(call(s, b, num_decode_seqs=62, max_decode_query_len=1)):.3f} ms", flush=True)
