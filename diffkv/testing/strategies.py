"""Hypothesis strategies with readable names, shared by ``tests/`` and the
conformance suite.

Everything is bounded by keyword arguments so the same strategies serve
small CPU/interpreter runs and large GPU runs::

    @given(case=attention_cases(max_q_len=8, max_context_len=64))
    def test_x(case): spec, features = case
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from hypothesis import strategies as st

from diffkv.testing.batches import BatchSpec, LayerFeatures, SeqShape

SEQ_KINDS = ("empty", "decode", "multi_token_decode", "chunked_prefill", "full_prefill")

HEAD_SIZE_PAIRS = ((192, 128), (128, 128), (64, 32), (32, 64), (96, 64), (64, 64))
"""(Dqk, Dv) pairs: the headline 192/128, equal sizes, Dv < Dqk and Dv > Dqk."""

SMALL_HEAD_SIZE_PAIRS = ((64, 32), (32, 64), (48, 32), (32, 32))
"""Cheap pairs for the Triton interpreter."""

BLOCK_SIZES = (16, 32, 64)

GQA_RATIOS = (1, 2, 4, 8)


@st.composite
def seq_shapes(draw, kind: str, *, max_q_len: int = 16, max_context_len: int = 64) -> SeqShape:
    """One sequence of the named kind (see :data:`SEQ_KINDS`)."""
    if kind == "empty":
        return SeqShape(q_len=0, context_len=draw(st.integers(0, max_context_len)))
    if kind == "decode":
        return SeqShape(q_len=1, context_len=draw(st.integers(0, max_context_len)))
    if kind == "multi_token_decode":
        q = draw(st.integers(2, max(2, min(8, max_q_len))))
        return SeqShape(q_len=q, context_len=draw(st.integers(1, max(1, max_context_len))))
    if kind == "chunked_prefill":
        q = draw(st.integers(min(9, max_q_len), max_q_len)) if max_q_len > 1 else 1
        return SeqShape(q_len=q, context_len=draw(st.integers(1, max(1, max_context_len))))
    if kind == "full_prefill":
        return SeqShape(q_len=draw(st.integers(1, max_q_len)), context_len=0)
    raise ValueError(f"kind={kind!r}; expected one of {SEQ_KINDS}")


@st.composite
def batch_compositions(
    draw,
    *,
    kinds: Iterable[str] = SEQ_KINDS,
    min_seqs: int = 1,
    max_seqs: int = 4,
    max_q_len: int = 16,
    max_context_len: int = 64,
) -> tuple[SeqShape, ...]:
    """A mix of sequences (empty, decode, multi-token decode, chunked and full
    prefill), in random order."""
    kinds = tuple(kinds)
    n = draw(st.integers(min_seqs, max_seqs))
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=n, max_size=n))
    return tuple(draw(seq_shapes(k, max_q_len=max_q_len, max_context_len=max_context_len)) for k in chosen)


@st.composite
def gqa_head_counts(draw, *, max_kv_heads: int = 2, ratios: Iterable[int] = GQA_RATIOS) -> tuple[int, int]:
    """(num_heads, num_kv_heads) with num_heads a multiple of num_kv_heads."""
    hkv = draw(st.integers(1, max_kv_heads))
    ratio = draw(st.sampled_from(tuple(ratios)))
    return hkv * ratio, hkv


def head_size_pairs(pairs: Iterable[tuple[int, int]] = HEAD_SIZE_PAIRS):
    """(Dqk, Dv) pairs."""
    return st.sampled_from(tuple(pairs))


def block_sizes(choices: Iterable[int] = BLOCK_SIZES):
    return st.sampled_from(tuple(choices))


@st.composite
def layer_features(
    draw,
    *,
    supported: Iterable[str] | None = None,
    max_window: int = 64,
    allow_none: bool = True,
) -> LayerFeatures:
    """Any combination of the optional features in ``supported`` (all if
    None): sliding window, softcap (including huge logits: small caps),
    ALiBi linear or sqrt, sinks, and a random scale."""
    sup = set(supported) if supported is not None else {"sliding_window", "softcap", "alibi", "alibi_sqrt", "sinks"}
    window = draw(st.one_of(st.none(), st.integers(1, max_window))) if "sliding_window" in sup else None
    softcap = draw(st.one_of(st.none(), st.sampled_from([0.5, 5.0, 30.0]))) if "softcap" in sup else None
    alibi_modes = [None] + [m for m, f in (("linear", "alibi"), ("sqrt", "alibi_sqrt")) if f in sup]
    alibi = draw(st.sampled_from(alibi_modes))
    sinks = draw(st.booleans()) if "sinks" in sup else False
    scale = draw(st.sampled_from([None, 0.05, 1.0, 20.0]))
    return LayerFeatures(sliding_window=window, softcap=softcap, alibi=alibi, sinks=sinks, scale=scale)


@st.composite
def batch_specs(
    draw,
    *,
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    pairs: Iterable[tuple[int, int]] = SMALL_HEAD_SIZE_PAIRS,
    block_size_choices: Iterable[int] = BLOCK_SIZES,
    max_kv_heads: int = 2,
    gqa_ratios: Iterable[int] = GQA_RATIOS,
    kinds: Iterable[str] = SEQ_KINDS,
    min_seqs: int = 1,
    max_seqs: int = 4,
    max_q_len: int = 16,
    max_context_len: int = 64,
    max_padding_rows: int = 3,
) -> BatchSpec:
    """A whole step: composition, heads, head sizes, block size, dtype,
    padding rows, permuted physical blocks."""
    seqs = draw(batch_compositions(kinds=kinds, min_seqs=min_seqs, max_seqs=max_seqs, max_q_len=max_q_len,
                                   max_context_len=max_context_len))
    h, hkv = draw(gqa_head_counts(max_kv_heads=max_kv_heads, ratios=gqa_ratios))
    dqk, dv = draw(head_size_pairs(pairs))
    return BatchSpec(
        seqs=seqs,
        num_heads=h,
        num_kv_heads=hkv,
        head_size=dqk,
        head_size_v=dv,
        block_size=draw(block_sizes(block_size_choices)),
        dtype=draw(st.sampled_from(tuple(dtypes))),
        padding_rows=draw(st.integers(0, max_padding_rows)),
        extra_blocks=draw(st.integers(0, 3)),
        permute_blocks=True,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def attention_cases(draw, *, supported_features: Iterable[str] | None = None, max_window: int = 64,
                    **spec_bounds) -> tuple[BatchSpec, LayerFeatures]:
    """(BatchSpec, LayerFeatures): one random attention call."""
    spec = draw(batch_specs(**spec_bounds))
    features = draw(layer_features(supported=supported_features, max_window=max_window))
    return spec, features
