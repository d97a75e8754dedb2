"""The class API (backend, impl, builder) and the functional API agree, on
the reference backend; the interface behaves as SPEC section 3 says."""

from __future__ import annotations

import subprocess
import sys

import torch

import diffkv
from diffkv.metadata import CommonAttentionMetadata, KVCacheSpec
from diffkv.reference import ReferenceBackend
from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, assert_close, make_batch


def test_kv_cache_shape_is_per_layer():
    s1 = ReferenceBackend.get_kv_cache_shape(10, 16, 4, 192, head_size_v=128)
    s2 = ReferenceBackend.get_kv_cache_shape(10, 16, 4, 192, head_size_v=64)
    assert s1 == (10, 16, 4, 320) and s2 == (10, 16, 4, 256)


def test_capabilities_are_data():
    caps = ReferenceBackend.capabilities
    assert torch.bfloat16 in caps.dtypes and "sinks" in caps.features and caps.block_size_multiple == 16
    assert ReferenceBackend.get_name().endswith("_DIFFKV")


def test_class_api_matches_functional_api_and_profiling_run_zero_fills():
    spec = BatchSpec(seqs=(SeqShape(4, 9), SeqShape(0, 3), SeqShape(1, 33)), num_heads=8, num_kv_heads=2,
                     head_size=64, head_size_v=32, padding_rows=2, seed=9)
    b = make_batch(spec, LayerFeatures(sliding_window=7, sinks=True, alibi="linear"))
    impl = ReferenceBackend.get_impl_cls()(**b.impl_kwargs())
    # cache update through the impl writes exactly the slots of the new tokens
    cache = b.kv_cache.clone()
    new_rows = b.slot_mapping[b.slot_mapping >= 0]
    flat = cache.view(-1, *cache.shape[2:])
    flat[new_rows] = 0
    impl.do_kv_cache_update(None, b.key, b.value, cache, b.slot_mapping)
    assert torch.equal(cache.nan_to_num(5.0), b.kv_cache.nan_to_num(5.0))

    kv_spec = KVCacheSpec(block_size=16, num_kv_heads=2, num_heads=8, head_size=64, head_size_v=32,
                          dtype=torch.float32)
    builder = ReferenceBackend.get_builder_cls()(kv_spec, "cpu", num_blocks=cache.shape[0])
    common = CommonAttentionMetadata.from_seq_lens([4, 0, 1], [13, 3, 34], b.block_table, b.slot_mapping)
    md = builder.build(0, common)
    out = b.fresh_out()
    impl.forward(None, b.query, b.key, b.value, cache, md, out)
    ref = diffkv.paged_attention(b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table,
                                 backend="reference", **b.attention_kwargs())
    assert_close(out[:5], ref[:5], torch.float32)
    assert torch.isnan(out[5:]).all()
    profiling = b.fresh_out()
    impl.forward(None, b.query, b.key, b.value, cache, None, profiling)
    assert (profiling == 0).all()


def test_functional_out_is_allocated_and_returned():
    b = make_batch(BatchSpec(seqs=(SeqShape(2, 2),), head_size=32, head_size_v=32))
    out = diffkv.paged_attention(b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table, scale=0.2,
                                 backend="reference")
    assert out.shape == (2, 4, 32)
    given = torch.empty_like(out)
    assert diffkv.paged_attention(b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table, scale=0.2,
                                  out=given, backend="reference") is given


def test_auto_picks_reference_on_cpu():
    from diffkv.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) is ReferenceBackend


def test_import_has_no_side_effects():
    code = (
        "import os, sys; before = dict(os.environ); import diffkv; "
        "assert dict(os.environ) == before, 'env changed'; "
        "assert 'vllm' not in sys.modules, 'vllm imported'; "
        "assert 'diffkv.triton.backend' not in sys.modules, 'triton backend imported eagerly'; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
