"""Experiment 17: where do decode B=1 / B=16 lose time against the best plain
read (exp16: a Triton streaming read reaches 87.5 % / 99.3 % of copy at their
byte counts, against 69.6 % / 88.2 % for the decode)?

A. Layout. The decode reads each KV head's rows of a page: 16 x 640 B at a
   2560 B stride (Hkv = 4), pages in permuted order. Read the same bytes (i)
   flat, (ii) page by page in permuted order, all heads at once (40 KB
   contiguous per page), (iii) per KV head like the decode. Prediction: (iii)
   costs 5-10 % against (i), explaining part of B=16's gap.
B. Kernel split. torch.profiler durations of the attention kernel and the
   split reduce in one eager decode forward (L2 flushed before): how much of
   B=1's ~8 us gap to the read is the reduce.

    python perf/exp17.py

Outcome (H100, perf/logs/exp17_h100.log; copy 3012 GB/s). A: reading the
decode's pages costs more than a flat read of the same bytes, and per-head
reads cost no more than whole pages: B=1 33.8 us = 82.4 % of copy per KV
head (whole pages 81.7 %; flat 87.5 % in exp16), B=16 116.7 us = 95.5 %
(whole pages 96.5 %; flat 99.3 %). (Configs over the shared-memory limit
print FAILED: OutOfResources; they are skipped.) B: B=1 attention kernel
33.6 us + reduce 2.4 us (eager, profiler), 39.7 us as a graph replay -- the
kernel alone runs at the paged-read floor; B=16 119.8 + 2.5 us, 126.0 us
replayed, kernel 3 us over the paged read's replay time.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401
import triton.language as tl

from diffkv.bench import SCENARIOS, _flush_buffer, as_graph, build_batch, measure_ceilings, time_fn, workload
from diffkv.triton.kernels import attention as tk


@triton.jit
def _read_pages(x_ptr, table_ptr, out_ptr, pages_per_prog, n_pages, stride_page, stride_tok,
                HEAD_W: tl.constexpr, NUM_H: tl.constexpr, PAGE: tl.constexpr,
                PAGES_PER_TILE: tl.constexpr, STAGES: tl.constexpr):
    """Program (h, p) reads pages [p * pages_per_prog, ...) of the permuted
    page table: the HEAD_W (= 256 + 64) values of heads h * NUM_H ...
    (h + 1) * NUM_H - 1 of every token row (NUM_H = 1: like the decode;
    NUM_H = Hkv: whole pages)."""
    h = tl.program_id(0)
    p = tl.program_id(1)
    TOK: tl.constexpr = PAGE * PAGES_PER_TILE
    rows = tl.arange(0, TOK)
    c1 = tl.arange(0, 256)
    c2 = 256 + tl.arange(0, 64)
    acc1 = tl.zeros([TOK, 256], dtype=tl.float32)
    acc2 = tl.zeros([TOK, 64], dtype=tl.float32)
    lo = p * pages_per_prog
    hi = tl.minimum(lo + pages_per_prog, n_pages)
    for t in tl.range(lo, hi, PAGES_PER_TILE, num_stages=STAGES):
        page_idx = t + rows // PAGE
        ok = page_idx < hi
        page = tl.load(table_ptr + page_idx, mask=ok, other=0).to(tl.int64)
        base = page * stride_page + (rows % PAGE).to(tl.int64) * stride_tok
        for hh in tl.static_range(NUM_H):
            hb = base + (h * NUM_H + hh) * HEAD_W
            acc1 += tl.load(x_ptr + hb[:, None] + c1[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            acc2 += tl.load(x_ptr + hb[:, None] + c2[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    total = tl.sum(tl.sum(acc1, axis=1), axis=0) + tl.sum(tl.sum(acc2, axis=1), axis=0)
    tl.store(out_ptr + h * tl.num_programs(1) + p, total)


def layout_floor(name: str, ceil: dict, sms: int) -> None:
    s = SCENARIOS[name]
    dev = torch.device("cuda")
    b = build_batch(s, dev)
    kv = b.kv_cache  # [num_blocks, 16, Hkv, 320]
    nblocks, page, hkv, width = kv.shape
    nbytes = workload(s)[0]
    table = torch.randperm(nblocks, device=dev).to(torch.int32)
    out = torch.empty(hkv * 8 * sms * 8, dtype=torch.float32, device=dev)
    print(f"{name}: KV {kv.numel() * 2 / 1e6:.1f} MB in {nblocks} pages of {page} tokens x {hkv} heads x {width}",
          flush=True)
    for per_head in (False, True):
        best = None
        for ppt in (1, 2, 4):
            for mult in (1, 2, 4, 8):
                for stages in (2, 3, 4):
                    heads = hkv if per_head else 1
                    progs = max(1, mult * sms // heads)
                    ppp = -(-nblocks // progs)
                    ppp = -(-ppp // ppt) * ppt
                    progs = -(-nblocks // ppp)

                    def fn():
                        _read_pages[(heads, progs)](kv, table, out, ppp, nblocks, kv.stride(0), kv.stride(1),
                                                    HEAD_W=width, NUM_H=1 if per_head else hkv, PAGE=page,
                                                    PAGES_PER_TILE=ppt, STAGES=stages, num_warps=8)
                    try:
                        fn()
                        torch.cuda.synchronize()
                        ms = time_fn(as_graph(fn) or fn, reps_ms=100)[0]
                    except Exception as e:  # noqa: BLE001
                        print(f"  per_head={per_head} ppt={ppt} FAILED {type(e).__name__}: {str(e)[:120]}")
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, ppt, mult, stages)
        ms, ppt, mult, stages = best
        kv_bytes = kv.numel() * 2
        print(f"{name}: {'per KV head (decode-like)' if per_head else 'whole pages, permuted':28s} best "
              f"{ms * 1e3:7.1f} us = {kv_bytes / ms / 1e6 / ceil['copy_GBps']:6.1%} of copy over the cache's "
              f"{kv_bytes / 1e6:.1f} MB (decode's bytes {nbytes / 1e6:.1f} MB; {ppt} pages/tile, {mult}x SMs, "
              f"{stages} stages)", flush=True)
    del b


def kernel_split(name: str) -> None:
    dev = torch.device("cuda")
    s = SCENARIOS[name]
    b = build_batch(s, dev)
    c = b.common
    ws = tk.Workspace.allocate(8192, 32, 128, dev)
    buf = _flush_buffer(dev)
    sink = torch.empty((), dtype=torch.float32, device=dev)

    def fn():
        tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out,
                           scale=192 ** -0.5, max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws)
    fn()
    g = as_graph(fn)
    med = time_fn(g or fn)[0]
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            torch.sum(buf, dim=0, out=sink)
            fn()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.key_averages():
        if "attention" in ev.key or "reduce" in ev.key:
            per[ev.key] = ev.device_time_total / max(1, ev.count)
    print(f"{name}: graph replay {med * 1e3:.1f} us; kernels (eager, us each): "
          + ", ".join(f"{k} {v:.1f}" for k, v in per.items()), flush=True)
    del b


def main():
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(torch.cuda.get_device_name(), f"{sms} SMs", flush=True)
    ceil = measure_ceilings(dev)
    print({k: round(v, 1) for k, v in ceil.items()}, flush=True)
    for name in ("decode_b1_32k", "decode_b16_8k"):
        kernel_split(name)
    for name in ("decode_b1_32k", "decode_b16_8k"):
        layout_floor(name, ceil, sms)


if __name__ == "__main__":
    main()
