"""An independent dense float64 formulation of SPEC section 2, in NumPy.

Written separately from ``diffkv.reference`` (row by row, NumPy, no shared
helpers) so the oracle is itself checked. Sinks are an extra logit column
whose value row is zero.
"""

from __future__ import annotations

import math

import numpy as np


def dense_attention_f64(batch) -> np.ndarray:
    """batch: a diffkv.testing.Batch. Returns float64 [T, H, Dv]; rows not
    owned by a sequence are NaN."""
    s = batch.spec
    f = batch.features
    q_all = batch.query.double().cpu().numpy()
    cache = batch.kv_cache.double().cpu().numpy()
    table = batch.block_table.cpu().numpy()
    qsl = batch.query_start_loc.cpu().numpy()
    seq_lens = batch.seq_lens.cpu().numpy()
    slopes = None if batch.alibi_slopes is None else batch.alibi_slopes.double().cpu().numpy()
    sinks = None if batch.sinks is None else batch.sinks.double().cpu().numpy()
    H, Hkv, Dqk, Dv, BS = s.num_heads, s.num_kv_heads, s.head_size, s.head_size_v, s.block_size
    group = H // Hkv
    out = np.full((batch.query.shape[0], H, Dv), np.nan)
    for seq in range(len(seq_lens)):
        n = int(seq_lens[seq])
        start, end = int(qsl[seq]), int(qsl[seq + 1])
        ctx = n - (end - start)
        # logical K/V rows of this sequence, token by token
        K = np.stack([cache[table[seq, j // BS], j % BS, :, :Dqk] for j in range(n)]) if n else np.zeros((0, Hkv, Dqk))
        V = np.stack([cache[table[seq, j // BS], j % BS, :, Dqk:] for j in range(n)]) if n else np.zeros((0, Hkv, Dv))
        for t in range(start, end):
            p = ctx + (t - start)
            for h in range(H):
                g = h // group
                logits = []
                values = []
                for j in range(n):
                    if j > p:
                        continue
                    if f.sliding_window is not None and p - j >= f.sliding_window:
                        continue
                    x = batch.scale * float(np.dot(q_all[t, h], K[j, g]))
                    if f.softcap is not None and f.softcap > 0:
                        x = f.softcap * math.tanh(x / f.softcap)
                    if f.alibi == "linear":
                        x += slopes[h] * (j - ctx)
                    elif f.alibi == "sqrt":
                        x -= slopes[h] * math.sqrt(p - j)
                    logits.append(x)
                    values.append(V[j, g])
                if sinks is not None:
                    logits.append(sinks[h])
                    values.append(np.zeros(Dv))
                logits = np.array(logits)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[t, h] = w @ np.stack(values)
    return out
