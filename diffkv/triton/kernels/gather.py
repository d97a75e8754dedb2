"""Copy the K/V rows of prefill sequences out of the paged cache into one
contiguous buffer, so that the prefill attention reads wide K/V tiles through
tensor descriptors (Hopper's tensor memory accelerator) instead of per-thread
pointer gathers (perf/exp12.py: 1x8k causal prefill 49.5% -> 65.9% of the
matmul ceiling on an H100, the copy itself ~1% of the time).

Row ``kv_start[s] + j`` of the buffer holds token ``j`` of sequence ``s``
(``j < seq_lens[s]``), all KV heads side by side: ``[rows, Hkv * (Dqk + Dv)]``.
Sequences outside the served ``q_len`` class have ``kv_start`` unused and are
skipped. Rows at or past the buffer's capacity are never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GATHER_ROWS = 32
"""Tokens per gather step."""

SEQ_BLOCK = 128
"""Sequences summed per step when a program computes its first buffer row."""

MAX_CHUNK_PROGRAMS = 1024
"""At most this many programs per (sequence, KV head); each loops over its
share of the sequence's chunks."""


@triton.jit
def _gather_kv_kernel(
    cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, W]
    buf_ptr,  # [capacity, Hkv * W]
    qsl_ptr,  # [S + 1] int32
    seq_lens_ptr,  # [S] int32
    bt_ptr,  # [S, num_bt_cols] int32
    kv_start_ptr,  # [S] int32, written here (served sequences only)
    capacity,
    num_bt_cols,
    q_len_lo,
    q_len_hi,
    stride_c0,
    stride_c1,
    stride_c2,
    stride_bt0,
    stride_buf0,
    BLOCK_SIZE: tl.constexpr,
    W: tl.constexpr,  # Dqk + Dv
    W_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
):
    # grid (S, P, Hkv): program p copies chunks p, p + P, ... of its sequence,
    # so every row is copied whatever the grid was sized for
    s = tl.program_id(0)
    h = tl.program_id(2)
    q_len = tl.load(qsl_ptr + s + 1) - tl.load(qsl_ptr + s)
    if (q_len < q_len_lo) | (q_len > q_len_hi):
        return
    seq_len = tl.load(seq_lens_ptr + s)
    # first buffer row: the served sequences before s, their seq_lens summed
    # (what kv_start_for computes with torch ops, here without extra launches)
    start = s * 0
    for base in range(0, s, SEQ_BLOCK):
        idx = base + tl.arange(0, SEQ_BLOCK)
        before = idx < s
        lens = tl.load(qsl_ptr + idx + 1, mask=before, other=0) - tl.load(qsl_ptr + idx, mask=before, other=0)
        keys = tl.load(seq_lens_ptr + idx, mask=before, other=0)
        start += tl.sum(tl.where(before & (lens >= q_len_lo) & (lens <= q_len_hi), keys, 0), 0)
    if (tl.program_id(1) == 0) & (h == 0):
        tl.store(kv_start_ptr + s, start)  # read by the attention kernel launched after this one
    w = tl.arange(0, W_PAD)
    for chunk in range(tl.program_id(1), tl.cdiv(seq_len, ROWS), tl.num_programs(1)):
        j = chunk * ROWS + tl.arange(0, ROWS)
        row = start + j
        ok = (j < seq_len) & ((j // BLOCK_SIZE) < num_bt_cols) & (row < capacity)
        block = tl.load(bt_ptr + s.to(tl.int64) * stride_bt0 + j // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        src = block * stride_c0 + (j % BLOCK_SIZE).to(tl.int64) * stride_c1 + h.to(tl.int64) * stride_c2
        m = ok[:, None] & (w < W)[None, :]
        vals = tl.load(cache_ptr + src[:, None] + w[None, :], mask=m)
        dst = row.to(tl.int64) * stride_buf0 + h * W
        tl.store(buf_ptr + dst[:, None] + w[None, :], vals, mask=m)


def kv_start_for(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, q_len_range: tuple[int, int]) -> torch.Tensor:
    """``[S]`` int32 first buffer row of each sequence whose ``q_len`` lies in
    ``q_len_range`` (an exclusive prefix sum of their ``seq_lens``): the
    readable statement of what :func:`gather_kv` writes to ``kv_start``
    (tests compare the two)."""
    S = seq_lens.shape[0]
    q_lens = query_start_loc[1 : S + 1] - query_start_loc[:S]
    served = (q_lens >= q_len_range[0]) & (q_lens <= q_len_range[1])
    eff = torch.where(served, seq_lens, torch.zeros_like(seq_lens))
    return (torch.cumsum(eff, 0, dtype=torch.int32) - eff).to(torch.int32)


def gather_kv(
    kv_cache: torch.Tensor,
    buf: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    kv_start: torch.Tensor,
    *,
    max_seq_len: int,
    q_len_range: tuple[int, int],
) -> None:
    """Fill ``buf`` ``[capacity, Hkv * (Dqk + Dv)]`` with the K/V rows of the
    sequences whose ``q_len`` lies in ``q_len_range`` (``max_seq_len``: a host
    hint of their ``seq_lens`` that sizes the grid; longer sequences are
    still copied whole, rows past the buffer never), and write each served
    sequence's first row to ``kv_start`` ``[S]`` int32 (an output: the
    exclusive prefix sum of the served ``seq_lens``, computed in the kernel
    -- no extra launches; entries of other sequences are left as they are).
    """
    S = seq_lens.shape[0]
    _, block_size, hkv, width = kv_cache.shape
    grid = (S, min(triton.cdiv(max(1, max_seq_len), GATHER_ROWS), MAX_CHUNK_PROGRAMS), hkv)
    _gather_kv_kernel[grid](
        kv_cache, buf, query_start_loc, seq_lens, block_table, kv_start,
        buf.shape[0], block_table.shape[1], q_len_range[0], q_len_range[1],
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), buf.stride(0),
        BLOCK_SIZE=block_size, W=width, W_PAD=triton.next_power_of_2(width), ROWS=GATHER_ROWS, SEQ_BLOCK=SEQ_BLOCK,
        num_warps=4,
    )
