"""Compiled Triton kernels on a CUDA GPU against the float64 reference
(``pytest -m gpu``; skipped without CUDA).

Every feature x dtype x batch class, long contexts (>= 32k keys), large GQA
ratios, many (Dqk, Dv) pairs, split-KV vs single pass, bitwise determinism,
CUDA-graph capture and replay with new metadata values, caches past 2^31
elements (int64 addressing), the cache writer, and hypothesis cross-checks.
NaN-prefilled padding rows are checked untouched everywhere
(:func:`tests.triton_common.check_output`).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkv
import diffkv.backends
from diffkv.reference import write_kv_cache as reference_write_kv_cache
from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, make_batch
from diffkv.testing.batches import BAD_BLOCK_ID
from diffkv.testing.strategies import HEAD_SIZE_PAIRS, attention_cases
from diffkv.testing.profiles import examples
from tests.triton_common import (
    build_metadata,
    check_output,
    reference_f64,
    run_class_api,
    run_functional,
    run_kernel,
)

pytestmark = pytest.mark.gpu

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DT_IDS = ["fp16", "bf16", "fp32"]

BATCH_CLASSES = {
    "decode": (SeqShape(1, 300), SeqShape(1, 17), SeqShape(1, 1000), SeqShape(1, 0)),
    "multi_token_decode": (SeqShape(4, 500), SeqShape(2, 40), SeqShape(7, 129)),
    "chunked_prefill": (SeqShape(70, 300), SeqShape(33, 1000)),
    "full_prefill": (SeqShape(200, 0), SeqShape(65, 0)),
    "mixed": (SeqShape(0, 50), SeqShape(1, 700), SeqShape(90, 250), SeqShape(5, 60), SeqShape(130, 0),
              SeqShape(0, 0)),
}

FEATURES = {
    "plain": LayerFeatures(),
    "window": LayerFeatures(sliding_window=100),
    "softcap_huge_logits": LayerFeatures(softcap=0.5, scale=20.0),
    "alibi_linear": LayerFeatures(alibi="linear"),
    "alibi_sqrt": LayerFeatures(alibi="sqrt"),
    "sinks": LayerFeatures(sinks=True),
    "all_linear": LayerFeatures(sliding_window=77, softcap=30.0, alibi="linear", sinks=True),
    "all_sqrt": LayerFeatures(sliding_window=200, softcap=5.0, alibi="sqrt", sinks=True, scale=0.3),
}


def spec(seqs, dtype=torch.bfloat16, **kw) -> BatchSpec:
    base = dict(seqs=seqs, num_heads=16, num_kv_heads=2, head_size=192, head_size_v=128, block_size=16, dtype=dtype,
                padding_rows=3, seed=7)
    base.update(kw)
    return BatchSpec(**base)


def gpu_batch(s: BatchSpec, features: LayerFeatures = LayerFeatures()):
    return make_batch(s, features, device=DEV)


# --------------------------------------------------------------- the matrix
@pytest.mark.parametrize("batch_class", list(BATCH_CLASSES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_dtype_batch_class(feature, dtype, batch_class):
    """Class API (builder workspace, heuristic tiles and splits), 192/128, GQA 8."""
    batch = gpu_batch(spec(BATCH_CLASSES[batch_class], dtype), FEATURES[feature])
    check_output(run_class_api(batch), batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_window_of_one_key(dtype):
    batch = gpu_batch(spec(BATCH_CLASSES["mixed"], dtype), LayerFeatures(sliding_window=1, sinks=True))
    check_output(run_functional(batch), batch)


# ------------------------------------------------------------ long contexts
@pytest.mark.parametrize(
    "seqs,features,dtype",
    [
        ((SeqShape(1, 32767),), LayerFeatures(sinks=True), torch.bfloat16),
        ((SeqShape(1, 40000),), LayerFeatures(), torch.float32),
        ((SeqShape(1, 32800),), LayerFeatures(sliding_window=128, sinks=True), torch.bfloat16),
        ((SeqShape(128, 32768),), LayerFeatures(softcap=30.0, alibi="linear"), torch.float16),
        ((SeqShape(4, 33000), SeqShape(1, 9000)), LayerFeatures(alibi="sqrt", sinks=True), torch.bfloat16),
    ],
    ids=["decode32k_sinks_bf16", "decode40k_fp32", "decode32k_window128_sinks", "chunk128_on_32k_fp16",
         "spec_decode_33k_bf16"],
)
def test_long_context(seqs, features, dtype):
    """>= 32k keys, H=32 / Hkv=4, 192/128 (the SPEC shape). A lone long
    decode must be split over many programs (flash-decoding)."""
    batch = gpu_batch(spec(seqs, dtype, num_heads=32, num_kv_heads=4), features)
    if seqs[0].q_len == 1 and len(seqs) == 1 and features.sliding_window is None:
        from diffkv.triton.backend import TritonBackend
        from diffkv.triton.kernels import attention as tk

        _, md = build_metadata(batch, TritonBackend)
        plan = tk.plan_for(batch.query, batch.kv_cache, batch.seq_lens, batch.block_table,
                           max_query_len=md.max_query_len, max_seq_len=md.max_seq_len, workspace=md.workspace)
        assert plan.num_splits >= 16, plan
    check_output(run_class_api(batch), batch)


# ----------------------------------------------------------------- GQA ratios
@pytest.mark.parametrize("heads", [(32, 1), (64, 1), (64, 2), (128, 1), (24, 8), (256, 1), (6, 6)],
                         ids=lambda h: f"H{h[0]}_Hkv{h[1]}")
@pytest.mark.parametrize("batch_class", ["decode", "mixed"])
def test_gqa_ratios(heads, batch_class):
    H, Hkv = heads
    batch = gpu_batch(spec(BATCH_CLASSES[batch_class], num_heads=H, num_kv_heads=Hkv),
                      LayerFeatures(sinks=True, alibi="linear"))
    check_output(run_class_api(batch), batch)


# --------------------------------------------------------------- head sizes
PAIRS = [(192, 128), (128, 128), (64, 32), (32, 64), (96, 64), (256, 256), (160, 96), (224, 48), (80, 144),
         (128, 256), (256, 128), (48, 32), (176, 112)]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}x{p[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_head_size_pairs(pair, dtype):
    batch = gpu_batch(spec(BATCH_CLASSES["mixed"], dtype, head_size=pair[0], head_size_v=pair[1], num_heads=8),
                      LayerFeatures(sinks=True, sliding_window=300))
    check_output(run_class_api(batch), batch)


@pytest.mark.parametrize("block_size", [32, 48, 64, 128, 256])
def test_block_sizes(block_size):
    batch = gpu_batch(spec(BATCH_CLASSES["mixed"], block_size=block_size), LayerFeatures(alibi="sqrt"))
    check_output(run_functional(batch), batch)


# ------------------------------------------------------ split vs single pass
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("batch_class", ["decode", "multi_token_decode", "chunked_prefill", "mixed"])
def test_split_matches_single_pass(dtype, batch_class):
    batch = gpu_batch(spec(BATCH_CLASSES[batch_class], dtype), FEATURES["all_linear"])
    single = run_kernel(batch, num_splits=1)
    ref = reference_f64(batch)
    check_output(single, batch, ref, what="single pass")
    tight = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    owned = batch.owned_rows.to(DEV)
    for n in (2, 8, 64):
        split = run_kernel(batch, num_splits=n)
        check_output(split, batch, ref, what=f"{n} splits")
        torch.testing.assert_close(split[owned].float(), single[owned].float(), atol=tight, rtol=tight)


# --------------------------------------------------------------- determinism
@pytest.mark.parametrize("batch_class", ["decode", "mixed"])
def test_bitwise_deterministic(batch_class):
    batch = gpu_batch(spec(BATCH_CLASSES[batch_class]), FEATURES["all_sqrt"])
    first = run_class_api(batch)
    for _ in range(3):
        again = run_class_api(batch)
        assert torch.equal(first.view(torch.int16), again.view(torch.int16))


# ----------------------------------------------------------------- CUDA graph
GRAPH_COMPOSITIONS = {
    # captured as a decode batch (T = 8, S = 4), replayed with other compositions
    "decode_captured": [
        (SeqShape(1, 100), SeqShape(4, 50), SeqShape(1, 10), SeqShape(2, 300)),
        (SeqShape(2, 700), SeqShape(1, 3), SeqShape(5, 20), SeqShape(0, 9)),
        (SeqShape(8, 0), SeqShape(0, 5), SeqShape(0, 2), SeqShape(0, 1000)),
        (SeqShape(1, 2000), SeqShape(1, 1), SeqShape(1, 64), SeqShape(5, 1500)),
    ],
    # captured as a mixed batch (two launches on two streams; T = 16, S = 4)
    "mixed_captured": [
        (SeqShape(12, 50), SeqShape(1, 100), SeqShape(1, 10), SeqShape(2, 300)),
        (SeqShape(1, 700), SeqShape(1, 3), SeqShape(9, 20), SeqShape(5, 9)),
        (SeqShape(16, 0), SeqShape(0, 5), SeqShape(0, 2), SeqShape(0, 1000)),
        (SeqShape(4, 2000), SeqShape(4, 1), SeqShape(4, 64), SeqShape(4, 1500)),
    ],
}


@pytest.mark.parametrize("name", list(GRAPH_COMPOSITIONS))
def test_cuda_graph_capture_and_replay_with_new_metadata(name):
    """Capture the forward once; replay it after writing new values into the
    same query / metadata / cache tensors (other batch compositions, same
    T and S). No host sync may happen inside (capture would fail)."""
    from diffkv.triton.backend import TritonBackend

    features = LayerFeatures(sinks=True, sliding_window=500, alibi="linear")
    comps = GRAPH_COMPOSITIONS[name]
    batches = [gpu_batch(spec(c, seed=i), features) for i, c in enumerate(comps)]
    for b in batches[1:]:
        b.alibi_slopes, b.sinks = batches[0].alibi_slopes, batches[0].sinks  # one layer
    first = batches[0]
    impl = TritonBackend.get_impl_cls()(**first.impl_kwargs())
    _, md = build_metadata(first, TritonBackend, max_num_batched_tokens=64)
    num_blocks = max(b.kv_cache.shape[0] for b in batches)
    width = max(b.block_table.shape[1] for b in batches)
    cache = torch.full((num_blocks, *first.kv_cache.shape[1:]), float("nan"), dtype=first.kv_cache.dtype, device=DEV)
    table = torch.full((len(comps), width), BAD_BLOCK_ID, dtype=torch.int32, device=DEV)
    query = torch.empty_like(first.query)
    out = torch.empty_like(first.out)

    def load(b):
        cache[: b.kv_cache.shape[0]].copy_(b.kv_cache)
        table.fill_(BAD_BLOCK_ID)
        table[:, : b.block_table.shape[1]].copy_(b.block_table)
        query.copy_(b.query)
        md.query_start_loc.copy_(b.query_start_loc)
        md.seq_lens.copy_(b.seq_lens)
        out.fill_(float("nan"))

    md.block_table = table
    load(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        impl.forward(None, query, None, None, cache, md, out)  # warm-up (compiles)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.forward(None, query, None, None, cache, md, out)
    for b in batches:
        load(b)
        graph.replay()
        torch.cuda.synchronize()
        check_output(out.clone(), b, what=f"graph replay {b.spec.describe()}")


def test_forward_allocates_nothing():
    """With the builder's workspace, a (split) forward makes no allocation."""
    from diffkv.triton.backend import TritonBackend

    batch = gpu_batch(spec(BATCH_CLASSES["decode"]), FEATURES["all_linear"])
    impl = TritonBackend.get_impl_cls()(**batch.impl_kwargs())
    _, md = build_metadata(batch, TritonBackend)
    out = batch.fresh_out()
    impl.forward(None, batch.query, None, None, batch.kv_cache, md, out)  # compiles, caches per-device params
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    impl.forward(None, batch.query, None, None, batch.kv_cache, md, out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    check_output(out, batch)


def test_auto_backend_is_triton_on_cuda():
    from diffkv.triton.backend import TritonBackend

    batch = gpu_batch(spec(BATCH_CLASSES["mixed"]), FEATURES["sinks"])
    assert diffkv.backends.resolve_backend("auto", batch.query.device) is TritonBackend
    out = batch.fresh_out()
    diffkv.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table,
                           out=out, **batch.attention_kwargs())
    check_output(out, batch)


# ------------------------------------------------------------ int64 offsets
def test_cache_past_2_to_the_31_elements():
    """Blocks at ids whose element offset exceeds 2^31 (int64 addressing),
    for the attention kernel and the cache writer."""
    small = gpu_batch(spec((SeqShape(1, 300), SeqShape(20, 40)), num_heads=8, num_kv_heads=1),
                      LayerFeatures(sinks=True))
    nb_small, bs, hkv, d = small.kv_cache.shape
    per_block = bs * hkv * d
    nb = (2**31) // per_block + 2 * nb_small + 8
    big = torch.empty((nb, bs, hkv, d), dtype=small.kv_cache.dtype, device=DEV)
    offset = nb - nb_small
    assert offset * per_block > 2**31
    big[offset:].copy_(small.kv_cache)
    table = small.block_table.clone()
    valid = table != BAD_BLOCK_ID
    table[valid] += offset
    ref = reference_f64(small)
    out = small.fresh_out()
    diffkv.paged_attention(small.query, big, small.query_start_loc, small.seq_lens, table, out=out, backend="triton",
                           **small.attention_kwargs())
    check_output(out, small, ref, what="blocks past 2^31 elements")
    # the cache writer at the same high slots
    slots = small.slot_mapping.clone()
    keep = slots >= 0
    slots[keep] += offset * bs
    big[offset:].fill_(0)
    diffkv.write_kv_cache(small.key, small.value, big, slots, backend="triton")
    expected = torch.zeros_like(big[offset:])
    reference_write_kv_cache(small.key, small.value, expected, small.slot_mapping)
    assert torch.equal(big[offset:].view(torch.int16), expected.view(torch.int16))
    del big


# ------------------------------------------------------------- cache writer
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "vllm_transposed"])
def test_cache_writer_bit_exact(dtype, slot_dtype, layout):
    g = torch.Generator().manual_seed(1)
    T, Hkv, Dqk, Dv, NB, BS = 300, 4, 192, 128, 40, 16
    key = torch.randn(T, Hkv, Dqk, generator=g).to(dtype)
    value = torch.randn(T, Hkv, Dv, generator=g).to(dtype)
    key[3, 1, 5] = float("nan")
    slots = torch.randperm(NB * BS, generator=g)[:T]
    slots[torch.rand(T, generator=g) < 0.2] = -1
    if layout == "contiguous":
        cache = torch.full((NB, BS, Hkv, Dqk + Dv), float("nan"), dtype=dtype)
    else:
        cache = torch.full((NB, Hkv, BS, Dqk + Dv), float("nan"), dtype=dtype).transpose(1, 2)
    expected = cache.clone()
    reference_write_kv_cache(key, value, expected, slots)
    cache = cache.to(DEV)
    if layout != "contiguous":
        cache = cache.transpose(1, 2).contiguous().transpose(1, 2)
    diffkv.write_kv_cache(key.to(DEV), value.to(DEV), cache, slots.to(DEV, slot_dtype), backend="triton")
    got = cache.cpu().contiguous()
    assert torch.equal(got.view(torch.uint8), expected.contiguous().view(torch.uint8))


# ------------------------------------------------------------ property based
@settings(max_examples=examples(40))
@given(case=attention_cases(dtypes=(torch.float16, torch.bfloat16, torch.float32), pairs=HEAD_SIZE_PAIRS,
                            max_kv_heads=4, max_seqs=8, max_q_len=80, max_context_len=700, max_window=300))
def test_hypothesis_functional_matches_reference(case):
    s, features = case
    batch = make_batch(s, features, device=DEV)
    check_output(run_functional(batch), batch)


@settings(max_examples=examples(20))
@given(case=attention_cases(dtypes=(torch.bfloat16, torch.float16), pairs=((192, 128), (128, 64), (64, 128)),
                            kinds=("decode", "multi_token_decode", "empty"), max_kv_heads=4, max_seqs=6,
                            max_context_len=3000),
       num_splits=st.sampled_from([None, 1, 3, 16]))
def test_hypothesis_decode_class_api(case, num_splits):
    s, features = case
    batch = make_batch(s, features, device=DEV)
    check_output(run_class_api(batch, num_splits=num_splits), batch, what=f"splits={num_splits}")


# --------------------------------------------- prefill K/V gathered copy (TMA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_prefill_reads_the_gathered_copy_on_hopper(dtype, monkeypatch):
    """On sm_90+ the class API's prefill launches gather K/V into the
    builder's buffer and read it through tensor descriptors (exact against the
    reference); where the buffer is too small for the real lengths, sequences
    that do not fit read the paged cache."""
    from diffkv.triton.kernels import attention as tk
    from diffkv.triton.kernels import gather

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90+")
    calls = []
    real = gather.gather_kv
    monkeypatch.setattr(gather, "gather_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = gpu_batch(spec(BATCH_CLASSES["chunked_prefill"] + BATCH_CLASSES["full_prefill"], dtype),
                      FEATURES["all_linear"])
    check_output(run_class_api(batch), batch, what="gathered prefill")
    assert calls, "the prefill launch did not gather"
    calls.clear()
    T, H, Dqk = batch.query.shape
    ws = tk.Workspace.allocate(64, H, 128, DEV, kv_rows=600, kv_row_width=2 * (Dqk + 128), kv_dtype=dtype)
    out = batch.fresh_out()
    kw = batch.attention_kwargs()
    kw.update(alibi_slopes=batch.alibi_slopes.to(DEV, torch.float32), sinks=batch.sinks.to(DEV, torch.float32))
    tk.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table, out,
                       workspace=ws, max_query_len=200, max_seq_len=100, **kw)
    assert calls, "the gathered path was not taken"
    check_output(out, batch, what="gather buffer overflow")
