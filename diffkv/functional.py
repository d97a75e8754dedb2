"""Functional API for callers who do not want classes.

``paged_attention`` and ``write_kv_cache`` validate their arguments
(including metadata *values*, read from small host copies) unless
``validate=False``, then dispatch to the chosen backend's kernels.
"""

from __future__ import annotations

import torch

from diffkv import validation
from diffkv.backends import resolve_backend
from diffkv.errors import UnsupportedConfigError


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
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """DiffKV paged attention (SPEC section 2), causal.

    Args:
        query: [T, H, Dqk].
        kv_cache: [num_blocks, block_size, Hkv, Dqk + Dv]; Dv = kv_cache.shape[-1] - Dqk.
        query_start_loc: [S + 1] int32, cumulative query lengths.
        seq_lens: [S] int32, keys per sequence *including* the new tokens.
        block_table: [S, max_blocks] int32.
        scale: logit scale (usually Dqk ** -0.5).
        sliding_window: W keys, the query itself included (None = full).
        softcap: c > 0 applies c * tanh(x / c) after the scale.
        alibi_slopes: [H] float; linear ALiBi relative to context_len, or
            sqrt mode with ``use_alibi_sqrt``.
        sinks: [H] float logits joining the softmax denominator only.
        out: [T, H, Dv]; allocated when None. Rows not owned by a sequence
            are never written.
        backend: "reference", "triton", "auto" (Triton on CUDA, reference on
            CPU) or "package.module:Class".
        validate: check metadata values too (reads small host copies).

    Returns:
        out.
    """
    Dqk, Dv = validation.check_attention_inputs(
        query, kv_cache, query_start_loc, seq_lens, block_table, out, alibi_slopes=alibi_slopes, sinks=sinks
    )
    T, H, _ = query.shape
    validation.check_layer_config(
        num_heads=H, num_kv_heads=kv_cache.shape[2], head_size=Dqk, head_size_v=Dv, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=softcap,
    )
    if use_alibi_sqrt and alibi_slopes is None:
        raise validation.InvalidInputError("use_alibi_sqrt=True needs alibi_slopes ([H] float); got None")
    backend_cls = resolve_backend(backend, query.device)
    reasons = backend_cls.validate_configuration(
        head_size=Dqk,
        head_size_v=Dv,
        dtype=query.dtype,
        block_size=kv_cache.shape[1],
        num_heads=H,
        num_kv_heads=kv_cache.shape[2],
        use_alibi=alibi_slopes is not None,
        use_alibi_sqrt=use_alibi_sqrt,
        use_sinks=sinks is not None,
        sliding_window=sliding_window,
        logits_soft_cap=softcap,
        device=query.device,
    )
    if reasons:
        raise UnsupportedConfigError(reasons, backend=backend_cls.get_name())
    if validate:
        validation.check_metadata_values(
            query_start_loc, seq_lens, block_table, num_tokens=T, block_size=kv_cache.shape[1],
            num_blocks=kv_cache.shape[0],
        )
    if out is None:
        out = torch.empty(T, H, Dv, dtype=query.dtype, device=query.device)
    if softcap is not None and softcap <= 0:
        softcap = None
    backend_cls.paged_attention(
        query, kv_cache, query_start_loc, seq_lens, block_table, scale=scale, sliding_window=sliding_window,
        softcap=softcap, alibi_slopes=alibi_slopes, use_alibi_sqrt=use_alibi_sqrt, sinks=sinks, out=out,
    )
    return out


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> None:
    """Store ``key [T, Hkv, Dqk]`` / ``value [T, Hkv, Dv]`` into the packed
    ``kv_cache`` at flat slots ``slot_mapping [T]`` (block * block_size +
    offset); a negative slot skips the token. Bit-exact."""
    validation.check_cache_write_inputs(key, value, kv_cache, slot_mapping)
    if validate:
        validation.check_slot_mapping_values(
            slot_mapping, num_tokens=key.shape[0], num_slots=kv_cache.shape[0] * kv_cache.shape[1]
        )
    backend_cls = resolve_backend(backend, key.device)
    reasons = backend_cls.validate_configuration(
        head_size=key.shape[-1], head_size_v=value.shape[-1], dtype=key.dtype, block_size=kv_cache.shape[1],
        device=key.device,
    )
    if reasons:
        raise UnsupportedConfigError(reasons, backend=backend_cls.get_name())
    backend_cls.write_kv_cache(key, value, kv_cache, slot_mapping)
