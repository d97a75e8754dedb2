"""Cache-writer kernel: new K/V rows into the packed paged cache.

Layout (SPEC section 1)::

    key        [T, Hkv, Dqk]        value [T, Hkv, Dv]
    kv_cache   [num_blocks, block_size, Hkv, Dqk + Dv]   (any strides on dims 0-2)
    slot_mapping [>= T]  int64 or int32; slot = block * block_size + offset,
                         negative = skip the token (padding)

Token ``t``'s K goes to ``kv_cache[slot // bs, slot % bs, :, :Dqk]`` and its V
to ``[..., Dqk:Dqk+Dv]``. Non-quantized caches are a bit-exact copy: the
values travel through registers in their own dtype, never converted.

All stores go through :func:`_store_cache_row`, the one place where a
quantizing variant (fp8 cache with a per-tensor scale) will fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_cache_row(ptr, values, mask):
    """Store one K or V row into the cache. A quantized cache would divide by
    its scale and cast to the cache dtype here."""
    tl.store(ptr, values, mask=mask)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_k0,
    stride_k1,
    stride_k2,
    stride_v0,
    stride_v1,
    stride_v2,
    stride_c0,
    stride_c1,
    stride_c2,
    BLOCK_SIZE: tl.constexpr,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    DQK_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
):
    # one program per (token, KV head)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = cache_ptr + block * stride_c0 + offset * stride_c1 + h * stride_c2

    dk = tl.arange(0, DQK_PAD)
    k_mask = dk < DQK
    k = tl.load(key_ptr + t * stride_k0 + h * stride_k1 + dk * stride_k2, mask=k_mask)
    _store_cache_row(dst + dk, k, k_mask)

    dv = tl.arange(0, DV_PAD)
    v_mask = dv < DV
    v = tl.load(value_ptr + t * stride_v0 + h * stride_v1 + dv * stride_v2, mask=v_mask)
    _store_cache_row(dst + DQK + dv, v, v_mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Launch the cache writer. Shapes are assumed checked
    (:func:`diffkv.validation.check_cache_write_inputs`); no device sync.

    key: [T, Hkv, Dqk]; value: [T, Hkv, Dv];
    kv_cache: [num_blocks, block_size, Hkv, Dqk + Dv]; slot_mapping: [>= T].
    """
    T, Hkv, Dqk = key.shape
    Dv = value.shape[2]
    if T == 0 or Hkv == 0:
        return
    _write_kv_cache_kernel[(T, Hkv)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        BLOCK_SIZE=kv_cache.shape[1],
        DQK=Dqk,
        DV=Dv,
        DQK_PAD=triton.next_power_of_2(Dqk),
        DV_PAD=triton.next_power_of_2(Dv),
        num_warps=1 if Dqk + Dv <= 256 else 2,
    )
