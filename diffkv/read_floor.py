"""Read floor of a decode batch: how long it takes just to *read* the K/V a
decode must read, in the cache's own layout, with no attention computed.

The benchmark divides this by a scenario's time (``%floor``): a decode kernel
cannot beat it, so the copy-bandwidth target and the floor together say
whether a miss is the kernel's or the layout's (perf/exp16.py: a flat read
beats a paged one by 5 % of copy at 84 MB on an H100; perf/exp17.py).

What is read: for every sequence ``s`` and KV head ``h``, the rows of tokens
``first_token[s] <= j < seq_lens[s]`` (all ``Dqk + Dv`` values of head ``h``),
found through the block table like the attention kernels find them -- each
needed K/V byte exactly once, nothing else. A few launch configurations are
timed and the fastest is the floor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffkv.triton.launch import split_head_dim


@triton.jit
def _paged_read_kernel(
    cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, HEAD_W]
    bt_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S] int32
    first_ptr,  # [S] int32, first token to read
    out_ptr,  # [Hkv, S, programs per sequence] fp32: one sum per program
    pages_per_prog,
    stride_c0,
    stride_c1,
    stride_c2,
    stride_bt0,
    BLOCK_SIZE: tl.constexpr,
    HEAD_W: tl.constexpr,  # Dqk + Dv
    W1: tl.constexpr,  # power-of-two chunk of HEAD_W (launch.split_head_dim)
    W2: tl.constexpr,  # padded remainder chunk (0: none)
    STAGES: tl.constexpr,
):
    """Program (h, s, c) reads pages ``[c * pages_per_prog, ...)`` of the
    pages holding sequence ``s``'s needed tokens, KV head ``h``, and stores
    the sum of what it read (so that nothing is optimised away)."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    c = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    first = tl.load(first_ptr + s)
    page_lo = first // BLOCK_SIZE + c * pages_per_prog
    page_hi = tl.minimum(page_lo + pages_per_prog, (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE)
    rows = tl.arange(0, BLOCK_SIZE)
    c1 = tl.arange(0, W1)
    acc1 = tl.zeros([BLOCK_SIZE, W1], tl.float32)
    if W2 > 0:
        c2 = W1 + tl.arange(0, W2)
        acc2 = tl.zeros([BLOCK_SIZE, W2], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt0
    for p in tl.range(page_lo, page_hi, num_stages=STAGES):
        page = tl.load(bt_row + p).to(tl.int64)
        tok = p * BLOCK_SIZE + rows
        ok = (tok >= first) & (tok < seq_len)
        base = page * stride_c0 + rows.to(tl.int64) * stride_c1 + h.to(tl.int64) * stride_c2
        acc1 += tl.load(cache_ptr + base[:, None] + c1[None, :], mask=ok[:, None] & (c1 < HEAD_W)[None, :],
                        other=0.0).to(tl.float32)
        if W2 > 0:
            acc2 += tl.load(cache_ptr + base[:, None] + c2[None, :], mask=ok[:, None] & (c2 < HEAD_W)[None, :],
                            other=0.0).to(tl.float32)
    total = tl.sum(tl.sum(acc1, 1), 0)
    if W2 > 0:
        total += tl.sum(tl.sum(acc2, 1), 0)
    tl.store(out_ptr + (h * tl.num_programs(1) + s) * tl.num_programs(2) + c, total)


def paged_read(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, first_token: torch.Tensor,
               programs_per_seq: int, stages: int = 3, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read the needed K/V rows once (see the module docstring).

    Args:
        kv_cache: [num_blocks, block_size, Hkv, Dqk + Dv].
        block_table: [S, max_blocks] int32; seq_lens, first_token: [S] int32.
        programs_per_seq: programs per (sequence, KV head); each reads an equal
            share of the sequence's pages (host bound: the block table width).
        out: [Hkv * S * programs_per_seq] fp32 scratch, or None.

    Returns:
        out: one sum per program (their total is the sum of every value read).
    """
    num_blocks, block_size, hkv, width = kv_cache.shape
    S, max_blocks = block_table.shape
    pages_per_prog = max(1, -(-max_blocks // programs_per_seq))
    programs_per_seq = -(-max_blocks // pages_per_prog)
    n = hkv * S * programs_per_seq
    if out is None or out.numel() < n:
        out = torch.empty(n, dtype=torch.float32, device=kv_cache.device)
    w1, w2 = split_head_dim(width)  # the loads mask both chunks to the width
    _paged_read_kernel[(hkv, S, programs_per_seq)](
        kv_cache, block_table, seq_lens, first_token, out, pages_per_prog,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0),
        BLOCK_SIZE=block_size, HEAD_W=width, W1=w1, W2=w2, STAGES=stages, num_warps=4,
    )
    return out[:n]


def paged_read_floor_ms(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        first_token: torch.Tensor, timer, num_sms: int) -> tuple[float, str]:
    """(fastest median ms, its configuration) of :func:`paged_read` over a
    few launch configurations (programs ~1/2/4 waves of ``num_sms``; 2-4
    pipeline stages), each timed by ``timer(fn) -> ms``."""
    hkv, S = kv_cache.shape[2], block_table.shape[0]
    scratch = torch.empty(hkv * S * block_table.shape[1], dtype=torch.float32, device=kv_cache.device)
    best = None
    for waves in (1, 2, 4):
        per_seq = max(1, min(block_table.shape[1], -(-waves * num_sms // (hkv * S))))
        for stages in (2, 3, 4):
            def fn(per_seq=per_seq, stages=stages):
                paged_read(kv_cache, block_table, seq_lens, first_token, per_seq, stages, out=scratch)
            ms = timer(fn)
            if best is None or ms < best[0]:
                best = (ms, f"{per_seq} programs per (sequence, KV head), {stages} stages")
    return best
