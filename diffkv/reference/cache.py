"""Reference cache writer."""

from __future__ import annotations

import torch


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store token t's K/V at flat slot ``slot_mapping[t]``; negative = skip.

    key: [T, Hkv, Dqk]; value: [T, Hkv, Dv];
    kv_cache: [num_blocks, block_size, Hkv, Dqk + Dv]; slot_mapping: [>= T].
    """
    T, _, Dqk = key.shape
    Dv = value.shape[-1]
    block_size = kv_cache.shape[1]
    slots = slot_mapping[:T].long()
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, offsets, :, :Dqk] = key[keep].to(kv_cache.dtype)
    kv_cache[blocks, offsets, :, Dqk : Dqk + Dv] = value[keep].to(kv_cache.dtype)
