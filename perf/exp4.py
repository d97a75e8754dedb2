"""Experiment 4 (product kernels): mixed batch one vs two launches; B=1 32k
decode and window-128 decode over tile sizes / split counts."""

from __future__ import annotations

import torch
import triton

from diffkv.bench import SCENARIOS, build_batch, measure_ceilings, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def call(s, b, ws, **kw):
    c = b.common
    return lambda: tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out,
                                      scale=192 ** -0.5, sliding_window=s.sliding_window, sinks=b.sinks,
                                      max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws, **kw)


def with_config(regime, block_n=None, warps=None, stages=None):
    key = ("sm90", regime, "16bit", 192, 128)
    old = launch.TUNED_CONFIGS[key]
    launch.TUNED_CONFIGS[key] = launch.TileConfig(old.block_m, block_n or old.block_n, warps or old.num_warps,
                                                  stages or old.num_stages, old.min_tiles_per_split)
    launch.plan_attention.cache_clear()
    return old


if __name__ == "__main__":
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name())
    ceil = measure_ceilings(dev)
    bw = ceil["copy_GBps"]
    print(ceil, flush=True)
    ws = tk.Workspace.allocate(4096, 32, 128, dev)

    s = SCENARIOS["mixed_2kchunk_62dec"]
    b = build_batch(s, dev)
    t1 = bench(call(s, b, ws))
    t2 = bench(call(s, b, ws, num_decode_seqs=62))
    print(f"mixed: one launch {t1:.3f} ms, two launches {t2:.3f} ms", flush=True)
    for part in ("mixed.prefill_part", "mixed.decode_part"):
        sp = SCENARIOS[part]
        bp = build_batch(sp, dev)
        print(f"  {part}: {bench(call(sp, bp, ws)):.3f} ms (split allowed), "
              f"{bench(call(sp, bp, None)):.3f} ms (unsplit)", flush=True)

    for name in ("decode_b1_32k", "decode_b16_8k", "decode_b64_8k_win128_sinks"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        nbytes, _ = workload(s)
        for bn in (32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
                old = with_config("decode", bn, warps, stages)
                if s.sliding_window:
                    launch.WINDOW_DECODE_BLOCK_N = bn
                for ns in ((None, 16, 32, 64, 128) if name == "decode_b1_32k" else (None, 2, 4, 8)):
                    try:
                        t = bench(call(s, b, ws, num_splits=ns))
                    except Exception as e:  # noqa: BLE001
                        print("fail", name, bn, warps, stages, ns, str(e)[:80])
                        continue
                    print(f"{name} bn={bn} w={warps} st={stages} splits={ns}: {t * 1e3:.1f} us "
                          f"{nbytes / t / 1e6 / bw:.0%} of copy", flush=True)
                launch.TUNED_CONFIGS[("sm90", "decode", "16bit", 192, 128)] = old
                launch.plan_attention.cache_clear()
