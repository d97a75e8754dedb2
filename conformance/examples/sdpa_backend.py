"""Example: wrap a backend that is only a plain function, so the
conformance suite can test it.

``sdpa_paged_attention`` stands for *your* kernel: it gathers each
sequence's K and V out of the packed paged cache and calls
``torch.nn.functional.scaled_dot_product_attention`` with an additive mask
(causal + sliding window + ALiBi). It has no softcap and no sinks -- SDPA
cannot express them -- so the backend does not declare them, and the suite
checks that they are *refused* with ``UnsupportedConfigError``.

The wrapper is the two classes at the bottom (about 30 lines):

* ``SDPAImpl(DiffKVImpl)`` implements two hooks, ``_write_kv_cache`` and
  ``_attention``; the base class already checks shapes/dtypes, refuses what
  the backend does not declare, and zero-fills the output on a profiling run.
* ``SDPABackend(DiffKVBackend)`` declares capabilities as data and points
  to the impl class.

Run the suite on it::

    diffkv-conformance --backend conformance.examples.sdpa_backend:SDPABackend
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffkv.interface import BackendCapabilities, DiffKVBackend, DiffKVImpl, Feature


# --------------------------------------------------------------------------- "your" kernel
def sdpa_paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    use_alibi_sqrt: bool = False,
    out: torch.Tensor,
) -> torch.Tensor:
    """Paged DiffKV attention by gather + SDPA, one sequence at a time.

    query [T, H, Dqk]; kv_cache [num_blocks, block_size, Hkv, Dqk + Dv];
    query_start_loc [S + 1]; seq_lens [S]; block_table [S, max_blocks];
    writes out [T, H, Dv] for the rows each sequence owns.
    """
    T, H, Dqk = query.shape
    block_size, Hkv = kv_cache.shape[1], kv_cache.shape[2]
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        start, end = qsl[s], qsl[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        j = torch.arange(seq_len, device=query.device)
        rows = kv_cache[block_table[s, j // block_size].long(), j % block_size]  # [seq_len, Hkv, Dqk + Dv]
        k = rows[..., :Dqk].transpose(0, 1).float().repeat_interleave(H // Hkv, dim=0)  # [H, seq_len, Dqk]
        v = rows[..., Dqk:].transpose(0, 1).float().repeat_interleave(H // Hkv, dim=0)  # [H, seq_len, Dv]
        q = query[start:end].transpose(0, 1).float()  # [H, q_len, Dqk]
        context_len = seq_len - q_len
        p = context_len + torch.arange(q_len, device=query.device)[:, None]  # absolute query positions
        allowed = j[None, :] <= p
        if sliding_window is not None:
            allowed &= (p - j[None, :]) < sliding_window
        bias = torch.zeros(H, q_len, seq_len, device=query.device)
        if alibi_slopes is not None:
            a = alibi_slopes.float()[:, None, None]
            if use_alibi_sqrt:
                bias = bias - a * torch.sqrt((p - j[None, :]).clamp(min=0).float())
            else:
                bias = bias + a * (j[None, :] - context_len).float()
        bias = bias.masked_fill(~allowed, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # [H, q_len, Dv]
        out[start:end] = o.transpose(0, 1).to(out.dtype)
    return out


# --------------------------------------------------------------------------- the adapter
class SDPAImpl(DiffKVImpl):
    def _write_kv_cache(self, key, value, kv_cache, slot_mapping):
        slots = slot_mapping[: key.shape[0]].long()
        keep = slots >= 0  # negative slot = padding token: skip
        blocks, offsets = slots[keep] // kv_cache.shape[1], slots[keep] % kv_cache.shape[1]
        kv_cache[blocks, offsets, :, : self.head_size] = key[keep]
        kv_cache[blocks, offsets, :, self.head_size:] = value[keep]

    def _attention(self, query, kv_cache, metadata, output):
        slopes, _ = self._params_on(query.device)  # fp32 [H] on the right device, cached
        n = metadata.num_reqs or metadata.seq_lens.shape[0]
        sdpa_paged_attention(
            query, kv_cache, metadata.query_start_loc[: n + 1], metadata.seq_lens[:n], metadata.block_table,
            scale=self.scale, sliding_window=self.sliding_window, alibi_slopes=slopes,
            use_alibi_sqrt=self.use_alibi_sqrt, out=output,
        )


class SDPABackend(DiffKVBackend):
    name = "SDPA_EXAMPLE_DIFFKV"
    capabilities = BackendCapabilities(
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        features=frozenset({Feature.SLIDING_WINDOW, Feature.ALIBI, Feature.ALIBI_SQRT, Feature.GQA}),
        devices=("cpu", "cuda"),
    )

    @classmethod
    def get_impl_cls(cls):
        return SDPAImpl


SDPAImpl.backend = SDPABackend
