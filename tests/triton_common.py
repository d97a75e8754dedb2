"""Helpers shared by the Triton tests (interpreter and GPU): run the backend
three ways (kernel launcher, functional API, class API) and compare with the
float64 reference, checking that padding rows stay untouched."""

from __future__ import annotations

import torch

import diffkv
from diffkv.metadata import CommonAttentionMetadata, KVCacheSpec
from diffkv.reference import paged_attention as reference_paged_attention
from diffkv.testing import Batch, assert_close


def reference_f64(batch: Batch) -> torch.Tensor:
    """The reference computed in float64 from the batch's (rounded) inputs,
    on the batch's device. Rows not owned by a sequence are NaN."""
    kw = batch.attention_kwargs()
    for name in ("alibi_slopes", "sinks"):
        if kw[name] is not None:
            kw[name] = kw[name].double()
    out = torch.full(batch.out.shape, float("nan"), dtype=torch.float64, device=batch.query.device)
    return reference_paged_attention(batch.query.double(), batch.kv_cache.double(), batch.query_start_loc,
                                     batch.seq_lens, batch.block_table, out=out, **kw)


def check_output(out: torch.Tensor, batch: Batch, ref: torch.Tensor | None = None, what: str = "triton") -> None:
    """Owned rows match the reference within the dtype's tolerance (no NaN);
    padding rows (prefilled with NaN) were not written."""
    owned = batch.owned_rows.to(out.device)
    pad = out[~owned]
    assert torch.isnan(pad).all(), f"{what}: padding rows past query_start_loc[-1] were written ({batch.reproducer()})"
    if ref is None:
        ref = reference_f64(batch)
    assert not torch.isnan(out[owned]).any(), f"{what}: NaN in an owned row ({batch.reproducer()})"
    assert_close(out[owned], ref[owned], batch.spec.dtype, what=f"{what} [{batch.reproducer()}]")


def device_params(batch: Batch):
    """alibi slopes / sinks as fp32 on the batch's device (what impls pass)."""
    dev = batch.query.device
    slopes = None if batch.alibi_slopes is None else batch.alibi_slopes.to(dev, torch.float32)
    sinks = None if batch.sinks is None else batch.sinks.to(dev, torch.float32)
    return slopes, sinks


def run_kernel(batch: Batch, num_splits: int | None = None, rows: int = 4096, **plan_hints) -> torch.Tensor:
    """The kernel launcher directly, with a workspace of ``rows`` (token x
    split) rows; ``num_splits`` forces the split count."""
    from diffkv.triton.kernels import attention

    T, H, _ = batch.query.shape
    ws = attention.Workspace.allocate(rows, H, batch.spec.head_size_v, batch.query.device)
    slopes, sinks = device_params(batch)
    out = batch.fresh_out()
    kw = batch.attention_kwargs()
    kw.update(alibi_slopes=slopes, sinks=sinks)
    attention.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table,
                              out, workspace=ws, num_splits=num_splits, **kw, **plan_hints)
    return out


def run_functional(batch: Batch) -> torch.Tensor:
    out = batch.fresh_out()
    diffkv.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table,
                           out=out, backend="triton", **batch.attention_kwargs())
    return out


def build_metadata(batch: Batch, backend_cls, max_num_batched_tokens: int | None = None):
    spec = batch.spec
    common = CommonAttentionMetadata.from_seq_lens(
        [s.q_len for s in spec.seqs], [s.seq_len for s in spec.seqs], batch.block_table, batch.slot_mapping,
        device=batch.query.device,
    )
    kv_spec = KVCacheSpec(
        block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, num_heads=spec.num_heads,
        head_size=spec.head_size, head_size_v=spec.head_size_v, dtype=spec.dtype, max_num_seqs=max(1, len(spec.seqs)),
        max_num_batched_tokens=max_num_batched_tokens or max(1, batch.query.shape[0]),
    )
    builder = backend_cls.get_builder_cls()(kv_spec, batch.query.device, num_blocks=batch.kv_cache.shape[0])
    return builder, builder.build(0, common)


def run_class_api(batch: Batch, num_splits: int | None = None) -> torch.Tensor:
    """Impl + metadata builder, as an engine would: cache update, then forward."""
    from diffkv.triton.backend import TritonBackend

    impl = TritonBackend.get_impl_cls()(**batch.impl_kwargs())
    impl.num_splits = num_splits
    _, md = build_metadata(batch, TritonBackend)
    cache = batch.kv_cache.clone()
    impl.do_kv_cache_update(None, batch.key, batch.value, cache, batch.slot_mapping)
    assert torch.equal(cache.view(torch.uint8), batch.kv_cache.view(torch.uint8)), "cache update changed the cache"
    out = batch.fresh_out()
    impl.forward(None, batch.query, batch.key, batch.value, cache, md, out)
    return out


def record_calls(monkeypatch, module, name: str, keyword: str) -> list:
    """Patch ``module.name`` to record each call's ``keyword`` argument
    (which kernel ran, with what) and return the list it appends to."""
    calls = []
    real = getattr(module, name)

    def recorded(*a, **k):
        calls.append(k.get(keyword))
        return real(*a, **k)

    monkeypatch.setattr(module, name, recorded)
    return calls
