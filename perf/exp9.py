"""Experiment 9: is ~15-20 us of every decode timing the benchmark's L2 flush?

Observation (exp7/exp8, H100): every decode row carries ~15-20 us above its
bytes / copy-bandwidth time, split or not (B=1 32k: 50 us for 28 us of bytes;
B=64 4k: 242 us for 226 us), and no kernel change moves it; the SPEC's peers
sit at the same times (cuDNN B=1 0.049 ms).

Hypothesis: triton's do_bench flushes L2 by *writing* 256 MB of zeros before
each run. L2 (50 MB on H100) is then full of dirty lines, and the timed
kernel's reads evict them: up to ~50 MB of write-back share DRAM with the
kernel (~17 us at 3 TB/s). A flush that *reads* 256 MB leaves clean lines:
K/V still come from DRAM, without the foreign write-back.

Prediction: with a read flush, decode times drop by ~15 us (B=1 32k: ~35 us,
~80% of copy), an empty graph costs a few us either way, and a plain read of
the same bytes shows the size-dependent cap.
"""

from __future__ import annotations

import statistics

import torch
import triton

from diffkv.bench import SCENARIOS, build_batch, workload
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk

KEY = ("sm90", "decode", "16bit", 192, 128)
KEY_SMALL = ("sm90", "decode", "16bit", "small")
TC = launch.TileConfig


def set_cfg(cfg):
    launch.TUNED_CONFIGS[KEY] = cfg
    launch.TUNED_CONFIGS[KEY_SMALL] = cfg
    launch.plan_attention.cache_clear()


FLUSH = None


def time_clean(fn, reps: int = 200) -> float:
    """Median ms; before each run 256 MB are *read* (L2 left clean)."""
    global FLUSH
    if FLUSH is None:
        FLUSH = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")
    fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        torch.sum(FLUSH, dim=0, out=out)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


def time_zero(fn) -> float:
    """Median ms with triton's do_bench (flush: 256 MB of zeros written)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_of(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    n = 1 << 29
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    cp = graph_of(lambda: dst.copy_(src))
    bw = {}
    for name, t in (("zero", time_zero), ("clean", time_clean)):
        ms = t(cp)
        bw[name] = 2 * n / ms / 1e6
        print(f"copy 1 GiB, {name} flush: {ms * 1e3:.1f} us, {bw[name]:.0f} GB/s", flush=True)
    del src, dst
    tiny = torch.zeros(1, device=dev)
    empty = graph_of(lambda: tiny.add_(1))
    print(f"floor (graph of one tiny kernel): zero flush {time_zero(empty) * 1e3:.1f} us, "
          f"clean flush {time_clean(empty) * 1e3:.1f} us", flush=True)

    ws = tk.Workspace.allocate(8192, 32, 128, dev)
    variants = {"old bn128 st3": TC(64, 128, 4, 3, 2, preload_tiles=0),
                "bn64 st3 p8": TC(64, 64, 4, 3, 4, preload_tiles=8),
                "bn32 st4 p16": TC(64, 32, 4, 4, 8, preload_tiles=16),
                "bn64 st2 p8": TC(64, 64, 4, 2, 4, preload_tiles=8)}
    for name in ("decode_b1_32k", "decode_b16_8k", "decode_b64_4k", "decode_b256_2k",
                 "decode_b64_8k_win128_sinks"):
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        nbytes, _ = workload(s)
        # a plain read of the same number of bytes (contiguous), and a copy of them
        flat = b.kv_cache.view(-1)[: nbytes // 2]
        acc = torch.empty((), dtype=torch.float32, device=dev)
        rd = graph_of(lambda: torch.sum(flat, dim=0, dtype=torch.float32, out=acc))
        half = flat[: flat.numel() // 2]
        dst = torch.empty_like(half)
        cpy = graph_of(lambda: dst.copy_(half))
        for meth, t in (("zero", time_zero), ("clean", time_clean)):
            ms_rd = t(rd)
            ms_cp = t(cpy)
            print(f"{name:28s} same bytes: read {ms_rd * 1e3:6.1f} us ({nbytes / ms_rd / 1e6 / bw[meth]:4.0%}), "
                  f"copy {ms_cp * 1e3:6.1f} us ({nbytes / ms_cp / 1e6 / bw[meth]:4.0%}) [{meth} flush]", flush=True)
        for vname, cfg in variants.items():
            set_cfg(cfg)

            def fn():
                tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out,
                                   scale=192 ** -0.5, sliding_window=s.sliding_window, sinks=b.sinks,
                                   max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws)
            try:
                g = graph_of(fn)
                tz = time_zero(g)
                tc = time_clean(g)
                print(f"{name:28s} {vname:14s} zero flush {tz * 1e3:6.1f} us {nbytes / tz / 1e6 / bw['zero']:4.0%} | "
                      f"clean flush {tc * 1e3:6.1f} us {nbytes / tc / 1e6 / bw['clean']:4.0%}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name:28s} {vname:14s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
