"""The reference (the oracle) against an independent dense float64 formulation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import diffkv
from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, assert_close, make_batch
from diffkv.testing.strategies import attention_cases
from diffkv.testing.profiles import examples
from tests.dense_f64 import dense_attention_f64

MIXED = (SeqShape(q_len=5, context_len=11), SeqShape(q_len=0, context_len=7), SeqShape(q_len=1, context_len=40),
         SeqShape(q_len=3, context_len=20), SeqShape(q_len=18, context_len=0))

FEATURES = {
    "plain": LayerFeatures(),
    "window_1": LayerFeatures(sliding_window=1),
    "window_16": LayerFeatures(sliding_window=16),
    "softcap": LayerFeatures(softcap=2.0, scale=3.0),
    "alibi_linear": LayerFeatures(alibi="linear"),
    "alibi_sqrt": LayerFeatures(alibi="sqrt"),
    "sinks": LayerFeatures(sinks=True),
}


def run_reference(batch, dtype=None):
    out = batch.fresh_out()
    diffkv.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table,
                           out=out, backend="reference", **batch.attention_kwargs())
    return out


def check_against_dense(batch):
    out = run_reference(batch)
    ref = dense_attention_f64(batch)
    owned = batch.owned_rows.numpy()
    o = out.double().numpy()
    assert np.isnan(o[~owned]).all(), "padding rows past query_start_loc[-1] were written"
    assert not np.isnan(o[owned]).any(), "an owned row was left unwritten or became NaN"
    if batch.spec.dtype == torch.float64:
        np.testing.assert_allclose(o[owned], ref[owned], atol=1e-12, rtol=1e-12)
    else:
        # fp32 inputs are computed in fp32 (SPEC step 1): rounding of logits of
        # magnitude ~|scale q.k| is amplified by the softmax, so the justified
        # per-dtype table applies (diffkv/testing/tolerances.py), as for any backend
        assert_close(torch.from_numpy(o[owned]), torch.from_numpy(ref[owned]), batch.spec.dtype)


@pytest.mark.parametrize("name", list(FEATURES))
def test_each_feature_alone(name):
    spec = BatchSpec(seqs=MIXED, num_heads=4, num_kv_heads=2, head_size=48, head_size_v=32, dtype=torch.float64,
                     padding_rows=2, seed=3)
    check_against_dense(make_batch(spec, FEATURES[name]))


PAIRS = [("window_16", "sinks"), ("alibi_linear", "sinks"), ("softcap", "alibi_sqrt"), ("window_1", "alibi_linear"),
         ("softcap", "sinks")]


@pytest.mark.parametrize("a,b", PAIRS)
def test_feature_pairs(a, b):
    fa, fb = FEATURES[a], FEATURES[b]
    merged = LayerFeatures(
        sliding_window=fa.sliding_window or fb.sliding_window,
        softcap=fa.softcap or fb.softcap,
        alibi=fa.alibi or fb.alibi,
        sinks=fa.sinks or fb.sinks,
        scale=fa.scale or fb.scale,
    )
    spec = BatchSpec(seqs=MIXED, num_heads=6, num_kv_heads=3, head_size=32, head_size_v=64, dtype=torch.float64,
                     block_size=32, padding_rows=1, seed=5)
    check_against_dense(make_batch(spec, merged))


def test_everything_at_once_fp32_inputs():
    spec = BatchSpec(seqs=MIXED, num_heads=8, num_kv_heads=2, head_size=64, head_size_v=32, dtype=torch.float32,
                     padding_rows=3, seed=11)
    check_against_dense(make_batch(spec, LayerFeatures(sliding_window=9, softcap=5.0, alibi="linear", sinks=True)))


def test_huge_logits_with_softcap_stay_finite():
    spec = BatchSpec(seqs=(SeqShape(4, 12),), num_heads=2, num_kv_heads=1, head_size=32, head_size_v=32,
                     dtype=torch.float32, seed=2)
    batch = make_batch(spec, LayerFeatures(softcap=1.0, scale=1e30))
    out = run_reference(batch)
    assert torch.isfinite(out).all()


def test_alibi_linear_differs_from_position_relative_only_with_sinks():
    """ALiBi relative to context_len vs. to the query position differ by a
    per-row constant: invisible without sinks, visible with them."""
    spec = BatchSpec(seqs=(SeqShape(6, 10),), num_heads=2, num_kv_heads=1, head_size=32, head_size_v=32,
                     dtype=torch.float64, seed=4)
    for sinks in (False, True):
        batch = make_batch(spec, LayerFeatures(alibi="linear", sinks=sinks))
        out = run_reference(batch).numpy()
        ref = dense_attention_f64(batch)
        np.testing.assert_allclose(out, ref, atol=1e-12)


@settings(max_examples=examples(30))
@given(case=attention_cases(dtypes=(torch.float64, torch.float32), max_q_len=12, max_context_len=40, max_seqs=3))
def test_random_feature_mixes_match_dense_f64(case):
    spec, features = case
    check_against_dense(make_batch(spec, features))


def test_q_len_zero_only_batch_writes_nothing():
    spec = BatchSpec(seqs=(SeqShape(0, 5), SeqShape(0, 0)), padding_rows=3, dtype=torch.float32)
    batch = make_batch(spec)
    out = run_reference(batch)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_computed_in_fp32(dtype):
    spec = BatchSpec(seqs=MIXED, num_heads=4, num_kv_heads=1, head_size=64, head_size_v=32, dtype=dtype, seed=8)
    batch = make_batch(spec, LayerFeatures(sinks=True, sliding_window=20))
    out = run_reference(batch)
    ref = torch.from_numpy(dense_attention_f64(batch))
    owned = batch.owned_rows
    # only the final rounding to `dtype` separates them
    eps = torch.finfo(dtype).eps
    err = (out[owned].double() - ref[owned]).abs()
    assert float(err.max()) <= eps * (1 + float(ref[owned].abs().max())), float(err.max())


def test_cache_writer_bit_exact_and_skips_negative_slots():
    g = torch.Generator().manual_seed(0)
    for dtype, (Dqk, Dv) in itertools.product([torch.float16, torch.bfloat16, torch.float32], [(192, 128), (32, 64)]):
        cache = torch.randn(4, 16, 2, Dqk + Dv, generator=g).to(dtype)
        before = cache.clone()
        key = torch.randn(5, 2, Dqk, generator=g).to(dtype)
        value = torch.randn(5, 2, Dv, generator=g).to(dtype)
        slots = torch.tensor([3, -1, 17, 63, -5], dtype=torch.int64)
        diffkv.write_kv_cache(key, value, cache, slots, backend="reference")
        expect = before.clone()
        for t, slot in enumerate(slots.tolist()):
            if slot >= 0:
                expect[slot // 16, slot % 16, :, :Dqk] = key[t]
                expect[slot // 16, slot % 16, :, Dqk:] = value[t]
        assert torch.equal(cache.view(torch.uint8), expect.view(torch.uint8))


def test_readme_mask_example_is_what_the_reference_computes():
    from pathlib import Path

    from diffkv.reference.attention import attention_logits, format_mask

    text = format_mask(context_len=2, q_len=4, sliding_window=3)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert text in readme
    x = attention_logits(torch.zeros(4, 1, 4), torch.zeros(6, 1, 4), context_len=2, scale=1.0, softcap=None,
                         sliding_window=3, alibi_slopes=None, use_alibi_sqrt=False)
    allowed = (x[0] > float("-inf")).tolist()
    rows = [line.split(":", 1)[1].split() for line in text.splitlines()[1:]]
    assert rows == [["x" if a else "." for a in r] for r in allowed]
