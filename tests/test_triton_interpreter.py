"""Triton kernels through the Triton interpreter (CPU, TRITON_INTERPRET=1)
against the float64 reference: cache writer, every feature, every batch kind,
the split-KV path, GQA packing, odd head sizes, the class/functional APIs.

Small shapes, fp32/fp16 only (bf16 ``tl.dot`` is wrong in the interpreter;
bf16 is covered by ``tests/test_triton_gpu.py``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkv
from diffkv.reference import write_kv_cache as reference_write_kv_cache
from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, make_batch
from diffkv.testing.strategies import SMALL_HEAD_SIZE_PAIRS, attention_cases, batch_specs
from diffkv.testing.profiles import examples
from diffkv.triton.kernels import attention as tk
from tests.triton_common import check_output, reference_f64, run_class_api, run_functional, run_kernel

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not tk.INTERPRETED, reason="Triton is not in interpreter mode (a GPU is visible)"),
    # the interpreter's own numpy noise (masked rows divide 0 by 0; never stored)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

# every batch kind: chunked prefill, empty, decode, multi-token decode, full prefill, long-ish decode
MIXED = (SeqShape(q_len=11, context_len=21), SeqShape(q_len=0, context_len=9), SeqShape(q_len=1, context_len=40),
         SeqShape(q_len=3, context_len=18), SeqShape(q_len=17, context_len=0), SeqShape(q_len=1, context_len=70))

FEATURES = {
    "plain": LayerFeatures(),
    "window": LayerFeatures(sliding_window=9),
    "window_1": LayerFeatures(sliding_window=1),
    "softcap_huge_logits": LayerFeatures(softcap=0.5, scale=20.0),
    "alibi_linear": LayerFeatures(alibi="linear"),
    "alibi_sqrt": LayerFeatures(alibi="sqrt"),
    "sinks": LayerFeatures(sinks=True),
    "all_linear": LayerFeatures(sliding_window=13, softcap=5.0, alibi="linear", sinks=True, scale=0.3),
    "all_sqrt": LayerFeatures(sliding_window=6, softcap=30.0, alibi="sqrt", sinks=True),
}


def mixed_spec(dtype, **kw) -> BatchSpec:
    base = dict(seqs=MIXED, num_heads=4, num_kv_heads=2, head_size=48, head_size_v=32, block_size=16, dtype=dtype,
                padding_rows=3, seed=11)
    base.update(kw)
    return BatchSpec(**base)


# ---------------------------------------------------------------- cache writer
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "vllm_transposed"])
def test_cache_writer_bit_exact(dtype, slot_dtype, layout):
    """K to [..., :Dqk], V to [..., Dqk:], negative slots skipped, nothing
    else touched, bit for bit (NaN payloads included), any strides on the
    first three cache dims."""
    g = torch.Generator().manual_seed(0)
    T, Hkv, Dqk, Dv, NB, BS = 9, 2, 48, 32, 5, 16
    key = torch.randn(T, Hkv, Dqk, generator=g).to(dtype)
    value = torch.randn(T, Hkv, Dv, generator=g).to(dtype)
    key[0, 0, 0] = float("nan")
    value[1, 1, 3] = float("-inf")
    slots = torch.randperm(NB * BS, generator=g)[:T]
    slots[[2, 5]] = -1
    if layout == "contiguous":
        cache = torch.full((NB, BS, Hkv, Dqk + Dv), float("nan"), dtype=dtype)
    else:  # vLLM hands [NB, Hkv, BS, D] viewed as [NB, BS, Hkv, D]
        cache = torch.full((NB, Hkv, BS, Dqk + Dv), float("nan"), dtype=dtype).transpose(1, 2)
    expected = cache.clone()
    reference_write_kv_cache(key, value, expected, slots)
    diffkv.write_kv_cache(key, value, cache, slots.to(slot_dtype), backend="triton")
    assert torch.equal(cache.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


@settings(max_examples=examples(10))
@given(
    T=st.integers(0, 12),
    hkv=st.integers(1, 3),
    pair=st.sampled_from(SMALL_HEAD_SIZE_PAIRS + ((80, 48),)),
    block_size=st.sampled_from([16, 32, 48]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cache_writer_hypothesis(T, hkv, pair, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    Dqk, Dv = pair
    NB = 4
    key = torch.randn(T, hkv, Dqk, generator=g).to(dtype)
    value = torch.randn(T, hkv, Dv, generator=g).to(dtype)
    slots = torch.randperm(NB * block_size, generator=g)[:T]
    slots[torch.rand(T, generator=g) < 0.3] = -1
    cache = torch.randn(NB, block_size, hkv, Dqk + Dv, generator=g).to(dtype)
    expected = cache.clone()
    reference_write_kv_cache(key, value, expected, slots)
    diffkv.write_kv_cache(key, value, cache, slots, backend="triton")
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("name", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_each_feature_single_pass_and_split(name, dtype):
    batch = make_batch(mixed_spec(dtype), FEATURES[name])
    ref = reference_f64(batch)
    check_output(run_kernel(batch, num_splits=1), batch, ref, what="single pass")
    check_output(run_kernel(batch, num_splits=3), batch, ref, what="3 splits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [2, 4, 5, 16])
def test_split_kv_matches_single_pass(dtype, num_splits):
    """Split-KV + reduce gives the single-pass answer to a tight tolerance,
    for decodes, multi-token decodes and chunked prefills (more splits than
    tiles included: empty splits must not disturb the result)."""
    seqs = (SeqShape(1, 90), SeqShape(4, 60), SeqShape(0, 3), SeqShape(9, 33), SeqShape(2, 0))
    batch = make_batch(mixed_spec(dtype, seqs=seqs, num_heads=8, num_kv_heads=2), FEATURES["all_linear"])
    single = run_kernel(batch, num_splits=1)
    split = run_kernel(batch, num_splits=num_splits)
    owned = batch.owned_rows
    tight = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(split[owned], single[owned], atol=tight, rtol=tight)
    assert torch.isnan(split[~owned]).all()
    check_output(split, batch, what=f"{num_splits} splits")


def test_split_is_chosen_for_small_decode_batches():
    """The heuristics split the KV of a lone long decode (and not of a big
    prefill), and the chosen plan is exercised by the functional API."""
    batch = make_batch(mixed_spec(torch.float32, seqs=(SeqShape(1, 200),)), LayerFeatures(sinks=True))
    plan = tk.plan_for(batch.query, batch.kv_cache, batch.seq_lens, batch.block_table, max_splits=64)
    assert plan.num_splits > 1
    check_output(run_functional(batch), batch)
    big = make_batch(mixed_spec(torch.float32, seqs=tuple(SeqShape(40, 0) for _ in range(4)), num_kv_heads=4,
                                num_heads=8))
    assert tk.plan_for(big.query, big.kv_cache, big.seq_lens, big.block_table, max_splits=64).num_splits == 1


@pytest.mark.parametrize("window,block_n,stages", [(None, 64, 3), (128, 16, 4), (256, 16, 4), (257, 64, 3),
                                                   (2048, 64, 3)])
def test_decode_tiles_follow_the_window_on_sm90(window, block_n, stages):
    """The SPEC shape's decode plan on sm_90 (host-only: no kernel runs):
    short windows read 16-key tiles (the bytes read stay close to the
    window's), long windows and whole contexts 64-key tiles."""
    from diffkv.triton import launch

    plan = launch.plan_attention(num_tokens=64, num_seqs=64, num_heads=32, num_kv_heads=8, head_size=192,
                                 head_size_v=128, dtype=torch.bfloat16, max_query_len=1, max_seq_len=8192,
                                 arch="sm90", num_sms=132, max_splits=1, sliding_window=window)
    assert (plan.block_n, plan.num_stages) == (block_n, stages)


@pytest.mark.parametrize(
    "pair", [(48, 32), (96, 64), (80, 48), (160, 32), (224, 32), (32, 96), (64, 64)],
    ids=lambda p: f"{p[0]}x{p[1]}",
)
def test_head_sizes(pair):
    """Dqk split into a power-of-two chunk + remainder (48 = 32 + 16,
    96 = 64 + 32, 80 = 64 + 16, 160 = 128 + 32), a padded single chunk
    (224), Dv not a power of two (48, 96)."""
    from diffkv.triton.launch import split_head_dim

    d1, d2 = split_head_dim(pair[0])
    assert d1 + d2 >= pair[0] and (d2 == 0 or d1 + d2 < triton_next_pow2(pair[0]))
    seqs = (SeqShape(5, 20), SeqShape(1, 33), SeqShape(0, 4))
    batch = make_batch(mixed_spec(torch.float16, seqs=seqs, head_size=pair[0], head_size_v=pair[1]),
                       LayerFeatures(sinks=True, alibi="linear"))
    check_output(run_kernel(batch), batch)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("heads", [(8, 1), (16, 2), (12, 4), (6, 6), (192, 1)], ids=lambda h: f"H{h[0]}_Hkv{h[1]}")
def test_gqa_ratios(heads):
    """Any H/Hkv ratio: 8, 8, 3 (padded head tile), 1, and 192 (two head
    tiles per KV head)."""
    H, Hkv = heads
    seqs = (SeqShape(3, 18), SeqShape(1, 25)) if H < 100 else (SeqShape(1, 20),)
    batch = make_batch(mixed_spec(torch.float32, seqs=seqs, num_heads=H, num_kv_heads=Hkv, head_size=32,
                                  head_size_v=32), LayerFeatures(alibi="sqrt", sinks=True))
    check_output(run_kernel(batch), batch)


@pytest.mark.parametrize("block_size", [16, 48, 64])
def test_block_sizes_and_tiles_spanning_pages(block_size):
    """KV tiles span several pages (block 16 < tile) or part of one (48, 64),
    over permuted blocks with poisoned unused slots and table columns."""
    batch = make_batch(mixed_spec(torch.float16, block_size=block_size), LayerFeatures(sliding_window=20))
    check_output(run_kernel(batch), batch)


def test_softcap_never_overflows():
    """Logits of order 1e30 through softcap: tanh saturates, no NaN/inf."""
    batch = make_batch(mixed_spec(torch.float32), LayerFeatures(softcap=1.0, scale=1e28, sinks=True))
    check_output(run_kernel(batch), batch)
    check_output(run_kernel(batch, num_splits=4), batch)


def test_cache_with_vllm_strides():
    """The cache as vLLM hands it: [NB, Hkv, BS, D] viewed as [NB, BS, Hkv, D]."""
    batch = make_batch(mixed_spec(torch.float16), LayerFeatures(sinks=True))
    NB, BS, Hkv, D = batch.kv_cache.shape
    strided = batch.kv_cache.transpose(1, 2).contiguous().transpose(1, 2)
    assert strided.stride(1) != Hkv * D
    batch.kv_cache = strided
    check_output(run_kernel(batch), batch)


def test_replay_with_new_metadata_values():
    """As in a CUDA-graph replay: the same metadata tensors get new values in
    place while the host hints (max_query_len, max_seq_len) stay stale; the
    forward reads the values on the device only."""
    from diffkv.triton.backend import TritonBackend
    from tests.triton_common import build_metadata

    first = make_batch(mixed_spec(torch.float32, seqs=(SeqShape(1, 75), SeqShape(2, 10), SeqShape(1, 5))),
                       LayerFeatures(sinks=True))
    second = make_batch(mixed_spec(torch.float32, seqs=(SeqShape(2, 61), SeqShape(0, 7), SeqShape(2, 40)), seed=5),
                        LayerFeatures(sinks=True))
    second.sinks = first.sinks  # one layer: the same parameters
    impl = TritonBackend.get_impl_cls()(**first.impl_kwargs())
    _, md = build_metadata(first, TritonBackend)
    out = first.fresh_out()
    impl.forward(None, first.query, None, None, first.kv_cache, md, out)
    check_output(out, first)
    # new values into the same tensors (second batch's block table fits its width)
    md.query_start_loc.copy_(second.query_start_loc)
    md.seq_lens.copy_(second.seq_lens)
    width = min(md.block_table.shape[1], second.block_table.shape[1])
    assert int(second.seq_lens.max()) <= width * first.spec.block_size
    md.block_table[:, :width].copy_(second.block_table[:, :width])
    out2 = second.fresh_out()
    impl.forward(None, second.query, None, None, second.kv_cache, md, out2)
    check_output(out2, second)


# ------------------------------------------------------------ property based
@settings(max_examples=examples(20))
@given(case=attention_cases(dtypes=(torch.float32, torch.float16), max_seqs=4, max_q_len=12, max_context_len=48,
                            max_window=40))
def test_hypothesis_functional_matches_reference(case):
    """Random batches x random feature combinations through
    ``diffkv.paged_attention(backend="triton")`` (heuristic tiles/splits)."""
    spec, features = case
    batch = make_batch(spec, features)
    check_output(run_functional(batch), batch)


@settings(max_examples=examples(10))
@given(case=attention_cases(dtypes=(torch.float32, torch.float16), max_seqs=3, max_q_len=10, max_context_len=40),
       num_splits=st.sampled_from([None, 1, 2, 7]))
def test_hypothesis_class_api_matches_reference(case, num_splits):
    """The impl/builder path (preallocated workspace), forced split counts."""
    spec, features = case
    batch = make_batch(spec, features)
    check_output(run_class_api(batch, num_splits=num_splits), batch, what=f"class api, splits={num_splits}")


@settings(max_examples=examples(8))
@given(spec=batch_specs(dtypes=(torch.float16,), kinds=("decode", "multi_token_decode"), min_seqs=1, max_seqs=3,
                        max_context_len=120))
def test_hypothesis_decode_batches_split(spec):
    """Decode and speculative-decode batches, where the split path matters."""
    batch = make_batch(spec, LayerFeatures(sinks=True, sliding_window=50))
    ref = reference_f64(batch)
    check_output(run_kernel(batch, num_splits=4), batch, ref, what="4 splits")
    check_output(run_kernel(batch), batch, ref, what="heuristic")


# ------------------------------------------------------------------- the API
def test_backend_declares_capabilities_and_reasons():
    from diffkv.interface import Feature
    from diffkv.triton.backend import TritonBackend

    assert TritonBackend.get_name() == "TRITON_DIFFKV"
    assert diffkv.load_backend("triton") is TritonBackend
    assert set(Feature.ALL) <= TritonBackend.capabilities.features
    assert TritonBackend.validate_configuration(head_size=192, head_size_v=128, dtype=torch.bfloat16, block_size=16,
                                                num_heads=32, num_kv_heads=4, use_alibi=True, use_sinks=True,
                                                sliding_window=128, logits_soft_cap=30.0, device="cpu") == []
    reasons = TritonBackend.validate_configuration(head_size=24, head_size_v=264, dtype=torch.float64,
                                                   kv_cache_dtype="fp8", block_size=8, attn_type="encoder",
                                                   chunk_lookback=2, use_output_quant=True, use_cascade=True)
    assert len(reasons) == 9, reasons


def test_auto_resolves_to_triton_for_cuda_tensors():
    from diffkv.backends import resolve_backend
    from diffkv.triton.backend import TritonBackend

    assert resolve_backend("auto", torch.device("cuda")) is TritonBackend
    assert resolve_backend("triton", torch.device("cpu")) is TritonBackend


def test_unsupported_config_raises_with_every_reason():
    from diffkv.triton.backend import TritonBackend

    with pytest.raises(diffkv.UnsupportedConfigError) as e:
        TritonBackend.get_impl_cls()(num_heads=4, head_size=24, scale=1.0, num_kv_heads=2, kv_cache_dtype="fp8",
                                     head_size_v=32, chunk_lookback=4)
    assert len(e.value.reasons) == 3
    batch = make_batch(mixed_spec(torch.float32, seqs=(SeqShape(1, 3),)))
    with pytest.raises(diffkv.UnsupportedConfigError):
        diffkv.paged_attention(batch.query.double(), batch.kv_cache.double(), batch.query_start_loc, batch.seq_lens,
                               batch.block_table, scale=1.0, backend="triton")


def test_profiling_run_and_empty_batches():
    from diffkv.triton.backend import TritonBackend

    batch = make_batch(mixed_spec(torch.float32, seqs=(SeqShape(0, 5), SeqShape(0, 0)), padding_rows=2))
    impl = TritonBackend.get_impl_cls()(**batch.impl_kwargs())
    out = batch.fresh_out()
    assert impl.forward(None, batch.query, None, None, batch.kv_cache, None, out) is out
    assert (out == 0).all()
    out = run_kernel(batch)
    assert torch.isnan(out).all(), "a batch of q_len = 0 sequences wrote output rows"


@pytest.mark.parametrize("features", [LayerFeatures(), LayerFeatures(sliding_window=5, sinks=True, alibi="linear")],
                         ids=["plain", "window_sinks_alibi"])
def test_mixed_batch_runs_decodes_and_prefills_with_their_own_tiles(features, monkeypatch):
    """A batch mixing decodes (q_len <= 8) and a longer chunk goes through two
    launches, one per class of sequences; together they write every owned row
    exactly as the reference and nothing else."""
    from diffkv.triton.kernels import attention as tk

    launches = []
    real_launch = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda *a, **k: launches.append(k["q_len_range"]) or real_launch(*a, **k))
    spec = BatchSpec(seqs=(SeqShape(1, 30), SeqShape(20, 17), SeqShape(0, 4), SeqShape(3, 9), SeqShape(12, 0)),
                     num_heads=4, num_kv_heads=2, head_size=32, head_size_v=32, dtype=torch.float16, padding_rows=2,
                     seed=21)
    batch = make_batch(spec, features)
    check_output(run_class_api(batch), batch, what="mixed, class API")
    assert len(launches) == 2 and launches[0][1] < launches[1][0], launches
    launches.clear()
    check_output(run_functional(batch), batch, what="mixed, functional")
    assert len(launches) == 2, launches


def test_mixed_launches_partition_sequences_for_any_metadata_values():
    """The two launches of a mixed batch are planned from host hints taken at
    build (or CUDA-graph capture) time; replayed with other query lengths --
    here decodes become 5-token drafts and a prefill shrinks -- every owned row
    must still be computed exactly once, by one of the two launches."""
    from diffkv.triton.kernels import attention as tk

    captured = dict(max_query_len=20, num_decode_seqs=2, max_decode_query_len=1)
    # 8 query heads per KV head: decode tiles hold 2 tokens, so 5-token drafts need the other launch
    replayed = BatchSpec(seqs=(SeqShape(5, 30), SeqShape(17, 6), SeqShape(5, 9), SeqShape(3, 0)), num_heads=16,
                         num_kv_heads=2, head_size=32, head_size_v=32, dtype=torch.float16, padding_rows=1, seed=4)
    batch = make_batch(replayed, LayerFeatures(sinks=True))
    slopes, sinks = batch.alibi_slopes, batch.sinks
    out = batch.fresh_out()
    tk.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table, out,
                       scale=batch.scale, sinks=sinks, alibi_slopes=slopes, max_seq_len=40, **captured)
    check_output(out, batch, what="mixed launches with stale host hints")


# --------------------------------------------- prefill K/V gathered copy (TMA)
GATHER_SEQS = (SeqShape(q_len=17, context_len=0), SeqShape(q_len=1, context_len=40), SeqShape(q_len=11, context_len=21),
               SeqShape(q_len=0, context_len=9), SeqShape(q_len=9, context_len=50))


@pytest.mark.parametrize("q_lo", [2, 1], ids=["served_q_len_ge_2", "boundary_q_len_1_served"])
@pytest.mark.parametrize("seq_block", [128, 2], ids=["one_step", "prefix_sum_over_steps"])
def test_gather_copies_the_served_sequences_rows_and_nothing_else(seq_block, q_lo, monkeypatch):
    """Each served sequence's K/V rows land at kv_start + j in order (pages
    permuted, slots past the sequence poisoned), kv_start (computed by the
    gather kernel, in steps of ``seq_block`` sequences) equals the readable
    prefix sum; sequences of the other q_len class and rows past the buffer's
    capacity are not written."""
    from diffkv.triton.kernels import gather

    monkeypatch.setattr(gather, "SEQ_BLOCK", seq_block)

    batch = make_batch(BatchSpec(seqs=GATHER_SEQS, num_heads=4, num_kv_heads=2, head_size=48, head_size_v=32,
                                 block_size=16, dtype=torch.float16, seed=5))
    served = [s.q_len >= q_lo for s in batch.spec.seqs]
    need = sum(s.seq_len for s, ok in zip(batch.spec.seqs, served) if ok)
    capacity = need - 5  # the last served sequence loses its last 5 rows
    width = batch.kv_cache.shape[2] * batch.kv_cache.shape[3]
    buf = torch.full((capacity + 8, width), -7.0, dtype=torch.float16)
    view = buf[:capacity]
    kv_start = torch.full((len(batch.spec.seqs),), -1, dtype=torch.int32)  # written by the gather for served ones
    gather.gather_kv(batch.kv_cache, view, batch.query_start_loc, batch.seq_lens, batch.block_table, kv_start,
                     max_seq_len=8, q_len_range=(q_lo, 2**31 - 1))  # a hint far below the lengths: still copied whole
    expected = torch.full_like(buf, -7.0)
    row = 0
    for s, (shape, ok) in enumerate(zip(batch.spec.seqs, served)):
        if not ok:
            assert int(kv_start[s]) == -1, f"sequence {s} is not served: its kv_start must stay untouched"
            continue
        assert int(kv_start[s]) == row
        for j in range(shape.seq_len):
            if row + j < capacity:
                block = int(batch.block_table[s, j // 16])
                expected[row + j] = batch.kv_cache[block, j % 16].reshape(-1)
        row += shape.seq_len
    assert torch.equal(buf.view(torch.int16), expected.view(torch.int16))
    readable = gather.kv_start_for(batch.query_start_loc, batch.seq_lens, (q_lo, 2**31 - 1))
    assert torch.equal(kv_start[served], readable[served])


def test_prefill_reads_the_gathered_copy_through_descriptors(monkeypatch):
    """The class API's builder holds a gather buffer; a prefill batch goes
    through it (gather launched, descriptor path) and matches the reference,
    for every feature."""
    from diffkv.triton.kernels import gather

    calls = []
    real = gather.gather_kv
    monkeypatch.setattr(gather, "gather_kv", lambda *a, **k: calls.append(k["q_len_range"]) or real(*a, **k))
    for name, features in FEATURES.items():
        batch = make_batch(BatchSpec(seqs=GATHER_SEQS, num_heads=4, num_kv_heads=2, head_size=48, head_size_v=32,
                                     block_size=16, dtype=torch.float16, padding_rows=2, seed=3), features)
        calls.clear()
        check_output(run_class_api(batch), batch, what=f"gathered prefill, {name}")
        assert calls, f"{name}: the prefill launch did not gather"


def test_gathered_copy_too_small_falls_back_to_paged_reads_per_sequence(monkeypatch):
    """Host hints (here a max_seq_len far below the real lengths) only steer
    performance: when the served sequences' rows overflow the gather buffer,
    the sequences that do not fit read the paged cache, and every row is
    still exact."""
    from diffkv.triton.kernels import gather

    calls = []
    real = gather.gather_kv
    monkeypatch.setattr(gather, "gather_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = BatchSpec(seqs=(SeqShape(17, 0), SeqShape(11, 21), SeqShape(9, 50)), num_heads=4, num_kv_heads=2,
                     head_size=48, head_size_v=32, block_size=16, dtype=torch.float16, padding_rows=2, seed=9)
    batch = make_batch(spec, LayerFeatures(sinks=True))
    T, H, _ = batch.query.shape
    ws = tk.Workspace.allocate(64, H, 32, "cpu", kv_rows=40, kv_row_width=2 * 80, kv_dtype=torch.float16)
    out = batch.fresh_out()
    kw = batch.attention_kwargs()
    kw["sinks"] = batch.sinks.float()
    tk.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table, out,
                       workspace=ws, max_query_len=17, max_seq_len=12, **kw)
    assert calls, "the gathered path was not taken"
    check_output(out, batch, what="gather buffer overflow")



def test_builder_defers_the_gather_buffer_until_a_triton_prefill_needs_it(monkeypatch):
    """Where the Gluon prefill kernel may serve the layer shape (sm_90), the
    builder does not allocate the 84 MB gather buffer up front. Simulated
    here (the interpreter never runs Gluon): the builder defers it; the first
    prefill that goes to the Triton kernel allocates it, once, at the size
    the builder would have used, and the output is exact."""
    from diffkv.triton import launch
    from diffkv.triton.backend import TritonBackend
    from tests.triton_common import build_metadata

    monkeypatch.setattr(tk, "gluon_may_serve", lambda device, **shape: True)
    spec = BatchSpec(seqs=(SeqShape(20, 0), SeqShape(9, 30)), num_heads=4, num_kv_heads=2, head_size=48,
                     head_size_v=32, block_size=16, dtype=torch.float16, padding_rows=2, seed=5)
    batch = make_batch(spec, LayerFeatures())
    builder, md = build_metadata(batch, TritonBackend)
    ws = builder.workspace
    assert ws.kv_rows is None and ws.kv_deferred is not None, "the gather buffer was allocated up front"
    rows, width, dtype, _ = ws.kv_deferred
    assert (rows, width, dtype) == (launch.gather_rows_capacity(builder.kv_cache_spec.max_num_batched_tokens),
                                    2 * (48 + 32), torch.float16)
    impl = TritonBackend.get_impl_cls()(**batch.impl_kwargs())
    out = batch.fresh_out()
    impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache.clone(), md, out)
    assert ws.kv_rows is not None and ws.kv_rows.shape == (rows, width) and ws.kv_deferred is None
    first = ws.kv_rows
    check_output(out, batch, what="deferred gather buffer")
    out2 = batch.fresh_out()
    impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache.clone(), md, out2)
    assert ws.kv_rows is first, "the deferred buffer was allocated twice"
    check_output(out2, batch, what="deferred gather buffer, second forward")

def test_ptxas_failure_rebuilds_the_variant_with_another_pipeline_depth(monkeypatch):
    """ptxas (CUDA 12.8) segfaults on a few kernel variants (seen on H100:
    64-row prefill tiles, 2 stages, ALiBi, 64-token pages). The launcher
    rebuilds such a variant with another ``num_stages`` (same grid, same
    result), warns once, and does not retry the failing depth on later calls.
    Simulated here: the tuned depth of every launch "fails to assemble"."""
    real = tk._attention_kernel
    tried = []

    class FailsAtTunedDepth:
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kw):
                tried.append(num_stages)
                if num_stages == failing_depth:
                    raise tk._PTXASError("ptxas died with signal 11 (simulated)")
                return real[grid](*args, num_stages=num_stages, **kw)
            return launch

    monkeypatch.setattr(tk, "_attention_kernel", FailsAtTunedDepth())
    monkeypatch.setattr(tk, "_STAGES_SUBSTITUTE", {})
    batch = make_batch(mixed_spec(torch.float16), LayerFeatures(alibi="sqrt", sinks=True))
    failing_depth = 2  # deeper than the interpreter configs use: nothing fails, nothing is substituted
    check_output(run_functional(batch), batch, what="no failure")
    assert 2 not in tried and not tk._STAGES_SUBSTITUTE
    failing_depth = tried[0]
    tried.clear()
    with pytest.warns(RuntimeWarning, match=f"num_stages={failing_depth}"):
        check_output(run_functional(batch), batch, what="rebuilt after a ptxas failure")
    assert tk._STAGES_SUBSTITUTE, "the substitute depth was not remembered"
    assert set(tk._STAGES_SUBSTITUTE.values()) == {failing_depth + 1}
    tried.clear()
    check_output(run_functional(batch), batch, what="second call")
    assert failing_depth not in tried, "the failing depth was retried on a later call"


# ---------------------------------------------------------------- launch trace
def test_trace_launches_records_what_ran_and_only_inside_the_block():
    """``trace_launches`` lists each kernel a forward launched (here the
    Triton attention with a forced 3-way split and its reduce), records
    nothing outside its block, and an inner trace leaves the outer one as
    it was. The traced call's output is still the reference's."""
    batch = make_batch(mixed_spec(torch.float32), LayerFeatures(), device="cpu")
    with tk.trace_launches() as outer:
        with tk.trace_launches() as inner:
            out = run_kernel(batch, num_splits=3, max_query_len=1)  # decode tiles: one launch, split
        assert outer == []
    check_output(out, batch)
    assert len(inner) == 1 and inner[0].startswith("triton attention ") and inner[0].endswith(
        "3 splits + reduce"), inner
    run_kernel(batch, num_splits=3, max_query_len=1)
    assert len(inner) == 1 and tk._LAUNCHES is None
