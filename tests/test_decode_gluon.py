"""The Gluon decode kernel (Hopper): its launch rules (host-only, run
everywhere), an offline sm_90 build checked with ptxas (no GPU needed) and,
on an sm_90 GPU (``pytest -m gpu``), its output against the float64
reference on named scenarios -- NaN-poisoned slots past each sequence,
permuted pages, speculative decodes, every served page size, sinks, fp16,
forced split counts including empty splits -- with a check that the Gluon
kernel really ran, and that batches it would serve slower go to the Triton
kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, make_batch
from diffkv.testing.profiles import examples
from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk
from diffkv.triton.kernels import decode_gluon as dg
from diffkv.triton.kernels import prefill_gluon as pg
from tests.triton_common import check_output, record_calls, run_class_api, run_functional, run_kernel


# ---------------------------------------------------------------- host rules
def test_split_plan_targets_half_the_sms_and_respects_bounds():
    """Splits bring the programs to about num_sms // 2 (H100, exp31), never
    below GLUON_DECODE_MIN_SPLIT_KEYS keys per split, never past the
    workspace; larger launches go to the Triton kernel."""
    plan = lambda p, tiles=512, ws=64, ns=None: launch.plan_gluon_decode(  # noqa: E731
        programs=p, kv_tiles=tiles, num_sms=132, max_splits=ws, num_splits=ns)
    assert [plan(p) for p in (4, 8, 16, 32, 64)] == [16, 8, 4, 2, 1]
    assert plan(4, tiles=20) == 20 // (launch.GLUON_DECODE_MIN_SPLIT_KEYS // 64)  # short contexts split less
    assert plan(4, ws=3) == 3 and plan(4, ns=40, ws=8) == 8 and plan(64, ns=5) == 5
    assert launch.gluon_decode_fits(66, 132) and not launch.gluon_decode_fits(67, 132)


def test_h200_rule_serves_more_programs_and_leaves_tiny_launches_to_triton():
    """Tuned per card (exp37): an H200 splits to about num_sms programs
    (B=16 x 8k: 2 splits, 91.7 vs 102.0 us unsplit), serves up to num_sms
    programs (B=32 x 8k) and leaves launches of < 8 programs (B=1, Hkv=4) to
    the Triton decode; every other card keeps the H100 rule."""
    h200 = launch.gluon_decode_rule("NVIDIA H200")
    assert h200 is launch.GLUON_DECODE_RULES["H200"]
    assert launch.gluon_decode_rule("NVIDIA H100 80GB HBM3") is launch.GLUON_DECODE_RULES["default"]
    assert launch.gluon_decode_rule("NVIDIA GH200 480GB") is h200
    plan = lambda p: launch.plan_gluon_decode(programs=p, kv_tiles=512, num_sms=132, max_splits=64,  # noqa: E731
                                              rule=h200)
    assert [plan(p) for p in (8, 16, 32, 64, 128)] == [16, 8, 4, 2, 1]
    assert [launch.gluon_decode_fits(p, 132, h200) for p in (4, 7, 8, 132, 133)] == [False, False, True, True, False]


@settings(max_examples=examples(50))
@given(programs=st.integers(1, 400), kv_tiles=st.integers(1, 4096), num_sms=st.integers(1, 200),
       max_splits=st.integers(1, 128), forced=st.one_of(st.none(), st.integers(1, 300)),
       card=st.sampled_from(sorted(launch.GLUON_DECODE_RULES)))
def test_split_plan_invariants(programs, kv_tiles, num_sms, max_splits, forced, card):
    """Any split plan stays within the workspace and MAX_SPLITS; an
    unforced one never grows the launch past the card rule's target (or its
    unsplit size), nor cuts splits below the minimum keys unless unsplit."""
    rule = launch.GLUON_DECODE_RULES[card]
    splits = launch.plan_gluon_decode(programs=programs, kv_tiles=kv_tiles, num_sms=num_sms, max_splits=max_splits,
                                      num_splits=forced, rule=rule)
    assert 1 <= splits <= max_splits
    if forced is None:
        assert splits <= launch.MAX_SPLITS
        assert programs * splits <= max(programs, int(num_sms * rule.target_sm_fraction))
        assert splits == 1 or kv_tiles // splits >= launch.GLUON_DECODE_MIN_SPLIT_KEYS // 64
    else:
        assert splits == min(forced, max_splits)


def test_query_tokens_per_program_fill_64_rows():
    assert dg.query_tokens_per_tile(32, 4, 1) == 1
    assert dg.query_tokens_per_tile(32, 4, 3) == 4
    assert dg.query_tokens_per_tile(32, 4, 8) == 8  # 8 tokens x 8 heads = 64 rows
    assert dg.query_tokens_per_tile(32, 4, 100) == 8
    assert dg.query_tokens_per_tile(64, 1, 4) == 1  # G = 64: one token per program


def test_rules_name_every_reason():
    q = torch.empty(4, 8, 192, dtype=torch.bfloat16)
    cache = torch.empty(10, 16, 2, 320, dtype=torch.bfloat16)
    args = dict(scale=0.1, sliding_window=None, softcap=None, alibi_slopes=None, compute_capability=90,
                interpreted=False)
    out = torch.empty(4, 8, 128, dtype=torch.bfloat16)
    assert [r for r in dg.unsupported_reasons(q, cache, out, **args) if "sm_90" not in r] == ([] if pg.AVAILABLE else [
        "triton.experimental.gluon is not available in this Triton"])
    wide = dg.unsupported_reasons(torch.empty(4, 128, 192, dtype=torch.bfloat16), torch.empty(10, 16, 1, 320,
                                  dtype=torch.bfloat16), torch.empty(4, 128, 128, dtype=torch.bfloat16), **args)
    assert any("128 query heads per KV head" in r for r in wide), wide
    reasons = dg.unsupported_reasons(q, cache, out, **{**args, "softcap": 30.0, "sliding_window": 64})
    assert any("softcap" in r for r in reasons) and any("sliding window" in r for r in reasons)


@pytest.mark.skipif(not pg.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.parametrize("block_size,split,sinks,query_tokens", [(16, True, False, 1), (16, False, True, 8),
                                                                 (128, True, False, 2)])
def test_kernel_builds_for_sm90_without_a_gpu(block_size, split, sinks, query_tokens):
    """Compile for sm_90 here (a child process without the interpreter):
    ptxas assembles it without spills or serialized wgmma, its shared memory
    fits one H100 block, and it has the design's parts (TMA loads, a
    register budget per partition, PV in flight during the softmax)."""
    code = (
        "import json, subprocess, tempfile, torch\n"
        "from triton.backends.nvidia.compiler import get_ptxas\n"
        "from diffkv.triton.kernels.decode_gluon import build_offline\n"
        f"k = build_offline({block_size}, {split}, {sinks}, query_tokens={query_tokens})\n"
        "ptx = k.asm['ptx']\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    open(d + '/k.ptx', 'w').write(ptx)\n"
        "    log = subprocess.run([get_ptxas(90).path, '-v', '--gpu-name=sm_90a', d + '/k.ptx', '-o', d + '/k.cubin'],\n"
        "                         capture_output=True, text=True).stderr\n"
        "print(json.dumps(dict(shared=k.metadata.shared, pv_in_flight='wgmma.wait_group.sync.aligned 1' in ptx,\n"
        "    tma='cp.async.bulk.tensor' in ptx, setmaxnreg='setmaxnreg' in ptx, serialized='serialized' in log,\n"
        "    spills='0 bytes spill stores, 0 bytes spill loads' not in log)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    assert built["shared"] <= 232448, built
    assert built["pv_in_flight"] and built["tma"] and built["setmaxnreg"], built
    assert not built["serialized"] and not built["spills"], built


# ---------------------------------------------------------------- on the GPU
def _on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and pg.AVAILABLE


hopper_only = pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU and Gluon")

SCENARIOS = {
    # (seqs, spec overrides, features)
    "single_decodes_at_page_edges": ((SeqShape(1, 0), SeqShape(1, 15), SeqShape(1, 16), SeqShape(1, 63),
                                      SeqShape(1, 1000), SeqShape(1, 4097)), {}, LayerFeatures()),
    "speculative_decodes": (tuple(SeqShape(q, c) for q, c in ((2, 30), (8, 100), (5, 0), (3, 700), (8, 64))), {},
                            LayerFeatures()),
    "sinks": ((SeqShape(1, 300), SeqShape(4, 90)), {}, LayerFeatures(sinks=True)),
    "gqa_16": ((SeqShape(1, 500), SeqShape(2, 77)), {"num_heads": 32, "num_kv_heads": 2}, LayerFeatures()),
    "block_32": ((SeqShape(1, 161), SeqShape(3, 70)), {"block_size": 32}, LayerFeatures()),
    "block_64": ((SeqShape(1, 161), SeqShape(3, 70)), {"block_size": 64}, LayerFeatures()),
    "block_128": ((SeqShape(1, 1610), SeqShape(3, 300)), {"block_size": 128}, LayerFeatures(sinks=True)),
    "fp16": ((SeqShape(1, 190), SeqShape(6, 33)), {"dtype": torch.float16}, LayerFeatures()),
    "seventy_sequences": (tuple(SeqShape(1 + i % 3, i * 7 % 300) for i in range(70)), {}, LayerFeatures()),
}


def _spec(seqs, **kw) -> BatchSpec:
    base = dict(seqs=seqs, num_heads=32, num_kv_heads=4, head_size=192, head_size_v=128, block_size=16,
                dtype=torch.bfloat16, padding_rows=3, seed=5)
    base.update(kw)
    return BatchSpec(**base)


@pytest.fixture
def decode_calls(monkeypatch):
    """Launches of the Gluon decode (their split counts)."""
    return record_calls(monkeypatch, dg, "decode", "num_splits")


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_gluon_decode_matches_reference(name, num_splits, decode_calls):
    """Forced split counts: 7 splits of a short sequence leave some empty."""
    seqs, overrides, features = SCENARIOS[name]
    batch = make_batch(_spec(seqs, **overrides), features, device="cuda")
    out = run_kernel(batch, num_splits=num_splits)
    assert decode_calls == [num_splits], decode_calls
    check_output(out, batch, what=f"gluon decode {name} splits={num_splits}")


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("api", ["functional", "class_api"])
def test_engine_paths_use_the_gluon_decode_for_small_batches(api, decode_calls):
    batch = make_batch(_spec((SeqShape(1, 3000), SeqShape(1, 20), SeqShape(2, 511))), LayerFeatures(sinks=True),
                       device="cuda")
    out = run_functional(batch) if api == "functional" else run_class_api(batch)
    assert decode_calls, "the Gluon decode did not run"
    check_output(out, batch, what=f"gluon decode ({api})")


@pytest.mark.gpu
@hopper_only
def test_large_decode_batches_go_to_the_triton_kernel(decode_calls):
    """More programs than the card's rule gives the Gluon decode (half the
    SMs on an H100): the Triton decode (two programs per SM) is as fast or
    faster, so the Gluon kernel does not run."""
    props = torch.cuda.get_device_properties(0)
    rule = launch.gluon_decode_rule(props.name)
    n = int(props.multi_processor_count * rule.max_sm_fraction) // 4 + 1  # Hkv = 4 programs per sequence
    batch = make_batch(_spec(tuple(SeqShape(1, 40 + i) for i in range(n))), device="cuda")
    check_output(run_functional(batch), batch, what="large decode batch")
    assert not decode_calls


@pytest.mark.gpu
@hopper_only
def test_stale_host_hints(decode_calls):
    """Hints from an earlier step (as at a CUDA-graph replay): max_query_len
    1 while queries have up to 5 tokens, max_seq_len far too small -- the
    kernel reads lengths on the device only, so the output is still right."""
    batch = make_batch(_spec((SeqShape(5, 900), SeqShape(1, 300), SeqShape(3, 2000))), device="cuda")
    out = run_kernel(batch, max_query_len=1, max_seq_len=64)
    assert decode_calls
    check_output(out, batch, what="gluon decode, stale hints")


@pytest.mark.gpu
@hopper_only
def test_triton_and_gluon_decodes_agree_with_reference(monkeypatch):
    batch = make_batch(_spec((SeqShape(1, 777), SeqShape(4, 2049))), LayerFeatures(sinks=True), device="cuda")
    check_output(run_kernel(batch), batch, what="gluon")
    monkeypatch.setattr(tk, "_USE_GLUON_DECODE", False)
    check_output(run_kernel(batch), batch, what="triton")
