"""Readable PyTorch reference of DiffKV paged attention -- the oracle.

This is SPEC section 2 written as code, one sequence and one step at a time.
Inputs in fp16/bf16/fp32 are computed in fp32; fp64 inputs in fp64.
"""

from __future__ import annotations

import torch


def gather_sequence_kv(
    kv_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int, head_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence, in token order.

    kv_cache: [num_blocks, block_size, Hkv, Dqk + Dv]; block_table_row: [max_blocks].
    Returns K [seq_len, Hkv, Dqk] and V [seq_len, Hkv, Dv].
    """
    block_size = kv_cache.shape[1]
    j = torch.arange(seq_len, device=kv_cache.device)
    blocks = block_table_row.long()[j // block_size]
    rows = kv_cache[blocks, j % block_size]  # [seq_len, Hkv, Dqk + Dv]
    return rows[..., :head_size], rows[..., head_size:]


def attention_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    context_len: int,
    scale: float,
    softcap: float | None,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
    use_alibi_sqrt: bool,
) -> torch.Tensor:
    """Steps 1-4 of SPEC section 2 for one sequence.

    q: [q_len, H, Dqk]; k: [seq_len, H, Dqk] (already expanded to query heads).
    Returns logits [H, q_len, seq_len], with disallowed keys at -inf.
    """
    q_len, seq_len = q.shape[0], k.shape[0]
    # 1. scaled dot product
    x = scale * torch.einsum("qhd,khd->hqk", q, k)
    # 2. softcap, after the scale (tanh saturates: no overflow)
    if softcap is not None and softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    # 3. causal mask (+ sliding window of W keys, the query itself included)
    p = context_len + torch.arange(q_len, device=q.device)[:, None]  # absolute query positions
    j = torch.arange(seq_len, device=q.device)[None, :]
    allowed = j <= p
    if sliding_window is not None:
        allowed &= (p - j) < sliding_window
    # 4. ALiBi, on allowed keys only
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(x.dtype)[:, None, None]
        if use_alibi_sqrt:
            x = x - slopes * torch.sqrt((p - j).clamp(min=0).to(x.dtype))
        else:
            x = x + slopes * (j - context_len).to(x.dtype)
    return x.masked_fill(~allowed, float("-inf"))


def softmax_with_sinks(x: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Step 5: softmax over keys, the sink joining the denominator only.

    x: [H, q_len, seq_len]; v: [seq_len, H, Dv]; sinks: [H] or None.
    Returns [q_len, H, Dv].
    """
    m = x.amax(dim=-1, keepdim=True)
    if sinks is not None:
        z = sinks.to(x.dtype)[:, None, None]
        m = torch.maximum(m, z)
    e = torch.exp(x - m)
    denom = e.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(z - m)
    out = torch.einsum("hqk,khd->qhd", e / denom, v)
    return out


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    use_alibi_sqrt: bool = False,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference DiffKV paged attention.

    query: [T, H, Dqk]; kv_cache: [num_blocks, block_size, Hkv, Dqk + Dv];
    query_start_loc: [S + 1]; seq_lens: [S]; block_table: [S, max_blocks].
    Writes out[t] (shape [T, H, Dv]) only for rows t owned by a sequence.
    """
    T, H, Dqk = query.shape
    Hkv = kv_cache.shape[2]
    Dv = kv_cache.shape[3] - Dqk
    if out is None:
        out = torch.empty(T, H, Dv, dtype=query.dtype, device=query.device)
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    qsl = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        start, end = qsl[s], qsl[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k, v = gather_sequence_kv(kv_cache, block_table[s], seq_len, Dqk)
        # GQA: query head h reads KV head h // (H / Hkv)
        k = k.to(compute).repeat_interleave(H // Hkv, dim=1)
        v = v.to(compute).repeat_interleave(H // Hkv, dim=1)
        x = attention_logits(
            query[start:end].to(compute),
            k,
            context_len=seq_len - q_len,
            scale=scale,
            softcap=softcap,
            sliding_window=sliding_window,
            alibi_slopes=alibi_slopes,
            use_alibi_sqrt=use_alibi_sqrt,
        )
        out[start:end] = softmax_with_sinks(x, v, sinks).to(out.dtype)
    return out


def format_mask(context_len: int, q_len: int, sliding_window: int | None = None) -> str:
    """The allowed (query row, key) pairs of one sequence as text, 'x' = allowed.

    >>> print(format_mask(context_len=2, q_len=4, sliding_window=3))
    keys j:          0 1 2 3 4 5
    row i=0 (p=2):   x x x . . .
    row i=1 (p=3):   . x x x . .
    row i=2 (p=4):   . . x x x .
    row i=3 (p=5):   . . . x x x
    """
    seq_len = context_len + q_len
    lines = ["keys j:          " + " ".join(str(j % 10) for j in range(seq_len))]
    for i in range(q_len):
        p = context_len + i
        row = " ".join(
            "x" if j <= p and (sliding_window is None or p - j < sliding_window) else "." for j in range(seq_len)
        )
        lines.append(f"row i={i} (p={p}):".ljust(17) + row)
    return "\n".join(lines)
