"""Every malformed input gets a typed, informative error; unsupported
configurations raise UnsupportedConfigError with every reason at once.
Nothing is written when an error is raised."""

from __future__ import annotations

import pytest
import torch

import diffkv
from diffkv import InvalidInputError, UnsupportedConfigError
from diffkv.metadata import CommonAttentionMetadata, KVCacheSpec
from diffkv.reference import ReferenceBackend
from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, make_batch


def base_batch(**features):
    spec = BatchSpec(seqs=(SeqShape(3, 5), SeqShape(1, 20)), num_heads=4, num_kv_heads=2, head_size=32,
                     head_size_v=64, padding_rows=1, seed=1)
    return make_batch(spec, LayerFeatures(**features))


def call(b, **over):
    args = dict(query=b.query, kv_cache=b.kv_cache, query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
                block_table=b.block_table)
    kwargs = dict(b.attention_kwargs(), out=b.out, backend="reference")
    for k, v in over.items():
        (args if k in args else kwargs)[k] = v
    return diffkv.paged_attention(args.pop("query"), args.pop("kv_cache"), args.pop("query_start_loc"),
                                  args.pop("seq_lens"), args.pop("block_table"), **kwargs)


def expect_error(exc_type, fragments, b, **over):
    cache_before = b.kv_cache.clone()
    with pytest.raises(exc_type) as info:
        call(b, **over)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} missing from message: {msg}"
    assert torch.isnan(b.out).all(), "output was touched although the call was rejected"
    assert torch.equal(b.kv_cache.nan_to_num(7.0), cache_before.nan_to_num(7.0)), "cache was modified"
    return msg


MALFORMED = {
    "query rank": (lambda b: dict(query=b.query[0]), ["query", "rank 3"]),
    "kv_cache rank": (lambda b: dict(kv_cache=b.kv_cache[0]), ["kv_cache", "rank 4"]),
    "H % Hkv": (lambda b: dict(query=torch.randn(b.query.shape[0], 3, 32), out=torch.full((b.query.shape[0], 3, 64),
                                                                                          float("nan"))),
                ["multiple of num_kv_heads"]),
    "kv_cache last dim too small": (lambda b: dict(query=torch.randn(b.query.shape[0], 4, 96)),
                                    ["kv_cache", "head_size"]),
    "sinks length": (lambda b: dict(sinks=torch.zeros(3)), ["sinks", "[4]"]),
    "alibi length": (lambda b: dict(alibi_slopes=torch.zeros(5)), ["alibi_slopes", "[4]"]),
    "query dtype mismatch": (lambda b: dict(query=b.query.half()), ["kv_cache", "dtype"]),
    "out dtype": (lambda b: dict(out=b.out.double()), ["output", "dtype"]),
    "out shape (Dqk instead of Dv)": (lambda b: dict(out=torch.full((b.out.shape[0], 4, 32), float("nan"))),
                                      ["output", "head_size_v"]),
    "seq_lens not int32": (lambda b: dict(seq_lens=b.seq_lens.long()), ["seq_lens", "int32"]),
    "qsl not int32": (lambda b: dict(query_start_loc=b.query_start_loc.long()), ["query_start_loc", "int32"]),
    "block_table not int32": (lambda b: dict(block_table=b.block_table.long()), ["block_table", "int32"]),
    "qsl wrong length": (lambda b: dict(query_start_loc=b.query_start_loc[:-1]), ["query_start_loc", "num_seqs + 1"]),
    "seq_len < q_len": (lambda b: dict(seq_lens=torch.tensor([2, 21], dtype=torch.int32)),
                        ["seq_lens[0]=2", "q_len"]),
    "block table too short": (lambda b: dict(seq_lens=torch.tensor([8, 60], dtype=torch.int32)),
                              ["block_table", "seq_lens[1]=60"]),
    "decreasing qsl": (lambda b: dict(query_start_loc=torch.tensor([0, 3, 2], dtype=torch.int32)),
                       ["query_start_loc", "decreases"]),
    "qsl past tokens": (lambda b: dict(query_start_loc=torch.tensor([0, 3, 99], dtype=torch.int32)),
                        ["query_start_loc[-1]=99"]),
    "block id out of range": (lambda b: dict(block_table=torch.where(b.block_table == b.block_table[0, 0],
                                                                      torch.tensor(10_000, dtype=torch.int32),
                                                                      b.block_table)),
                              ["block_table[0, 0]=10000", "out of range"]),
    "negative block id": (lambda b: dict(block_table=torch.where(b.block_table == b.block_table[1, 1],
                                                                 torch.tensor(-3, dtype=torch.int32), b.block_table)),
                          ["block_table[1, 1]=-3"]),
    "negative seq_len": (lambda b: dict(seq_lens=torch.tensor([-1, 21], dtype=torch.int32),
                                        query_start_loc=torch.tensor([0, 0, 1], dtype=torch.int32)),
                         ["seq_lens[0]=-1"]),
    "window zero": (lambda b: dict(sliding_window=0), ["sliding_window=0"]),
    "softcap nan": (lambda b: dict(softcap=float("nan")), ["logits_soft_cap"]),
    "sqrt without slopes": (lambda b: dict(use_alibi_sqrt=True, alibi_slopes=None), ["use_alibi_sqrt", "alibi_slopes"]),
    "query not a tensor": (lambda b: dict(query=[1, 2, 3]), ["query", "torch.Tensor"]),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_raises_value_error(name):
    b = base_batch()
    make_override, fragments = MALFORMED[name]
    expect_error(InvalidInputError, fragments, b, **make_override(b))
    assert issubclass(InvalidInputError, ValueError)


def test_unsupported_config_lists_every_reason():
    reasons = ReferenceBackend.validate_configuration(
        head_size=24, head_size_v=128, block_size=8, kv_cache_dtype="fp8_e4m3", attn_type="encoder",
        chunk_lookback=4, use_output_quant=True, use_cascade=True, dtype=torch.int8,
    )
    joined = "\n".join(reasons)
    for frag in ["head_size=24", "block_size=8", "fp8_e4m3", "quantized", "encoder", "chunk_lookback=4",
                 "output quantization", "cascade", "dtype=torch.int8"]:
        assert frag in joined, f"{frag!r} missing from {reasons}"
    assert len(reasons) == 8  # the fp8 cache is one reason naming both the dtype and "quantized"


def test_valid_configuration_has_no_reasons():
    assert ReferenceBackend.validate_configuration(head_size=192, head_size_v=128, block_size=16,
                                                   dtype=torch.bfloat16, num_heads=32, num_kv_heads=4,
                                                   use_sinks=True, sliding_window=128) == []


def test_per_token_head_quant_is_unsupported():
    with pytest.raises(UnsupportedConfigError) as info:
        ReferenceBackend.get_impl_cls()(num_heads=4, head_size=64, scale=0.1, num_kv_heads=2, head_size_v=32,
                                        kv_cache_dtype="fp8_per_token_head")
    assert "per-token-head" in str(info.value)
    assert isinstance(info.value, NotImplementedError)


def test_impl_construction_collects_all_reasons():
    with pytest.raises(UnsupportedConfigError) as info:
        ReferenceBackend.get_impl_cls()(num_heads=4, head_size=20, scale=0.1, num_kv_heads=2, head_size_v=32,
                                        kv_cache_dtype="fp8", attn_type="encoder_only", chunk_lookback=2)
    assert len(info.value.reasons) == 4, info.value.reasons


def test_block_size_not_multiple_of_16_is_unsupported_at_call():
    spec = BatchSpec(seqs=(SeqShape(2, 3),), block_size=8, head_size=32, head_size_v=32)
    b = make_batch(spec)
    with pytest.raises(UnsupportedConfigError, match="block_size=8"):
        call(b)
    assert torch.isnan(b.out).all()


def _impl_and_metadata(b):
    impl = ReferenceBackend.get_impl_cls()(**b.impl_kwargs())
    spec = KVCacheSpec(block_size=b.spec.block_size, num_kv_heads=b.spec.num_kv_heads, num_heads=b.spec.num_heads,
                       head_size=b.spec.head_size, head_size_v=b.spec.head_size_v, dtype=b.spec.dtype)
    builder = ReferenceBackend.get_builder_cls()(spec, "cpu", num_blocks=b.kv_cache.shape[0])
    qsl = b.query_start_loc.tolist()
    common = CommonAttentionMetadata.from_seq_lens([qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)],
                                                   b.seq_lens.tolist(), b.block_table, b.slot_mapping)
    return impl, builder, common


def test_forward_rejects_output_scale_and_cascade():
    b = base_batch(sinks=True)
    impl, builder, common = _impl_and_metadata(b)
    md = builder.build(0, common)
    with pytest.raises(UnsupportedConfigError, match="output quantization"):
        impl.forward(None, b.query, b.key, b.value, b.kv_cache, md, b.out, output_scale=torch.ones(1))
    md.use_cascade = True
    with pytest.raises(UnsupportedConfigError, match="cascade"):
        impl.forward(None, b.query, b.key, b.value, b.kv_cache, md, b.out)
    assert torch.isnan(b.out).all()


def test_builder_checks_metadata_values():
    b = base_batch()
    impl, builder, common = _impl_and_metadata(b)
    common.seq_lens_cpu = torch.tensor([1, 21], dtype=torch.int32)
    with pytest.raises(InvalidInputError, match="seq_lens\\[0\\]=1"):
        builder.build(0, common)


def test_cache_write_errors():
    b = base_batch()
    with pytest.raises(InvalidInputError, match="slot_mapping"):
        diffkv.write_kv_cache(b.key, b.value, b.kv_cache, b.slot_mapping.float(), backend="reference")
    with pytest.raises(InvalidInputError, match="head_size_v 16"):
        diffkv.write_kv_cache(b.key, b.value[..., :16], b.kv_cache, b.slot_mapping, backend="reference")
    bad = b.slot_mapping.clone()
    bad[0] = b.kv_cache.shape[0] * b.kv_cache.shape[1]
    before = b.kv_cache.clone()
    with pytest.raises(InvalidInputError, match=r"slot_mapping\[0\]"):
        diffkv.write_kv_cache(b.key, b.value, b.kv_cache, bad, backend="reference")
    assert torch.equal(before.nan_to_num(3.0), b.kv_cache.nan_to_num(3.0))


def test_unknown_backend_name():
    b = base_batch()
    with pytest.raises(InvalidInputError, match="backend='cuda_magic'"):
        call(b, backend="cuda_magic")
