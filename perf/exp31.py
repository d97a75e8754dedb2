"""Experiment 31: a Gluon split-KV decode (producer warp streaming page boxes
by TMA into a 4-tile ring, one consumer warpgroup; GQA rows packed) against
the Triton decode.

Prediction: with 160 KB in flight per SM and the reduce the only other
launch, decode B=16 x 8k reaches >= 91 % of copy (Triton: 88 %, paged-read
floor 94.5 %) and B=1 x 32k gets from 70 % to >= 75 %.

Part A checks outputs against the float64 reference on odd batches
(NaN-poisoned pages, speculative decodes, page sizes 16-128, sinks, forced
splits) and that the Gluon kernel ran; part B times both kernels on SPEC's
decode scenarios (CUDA-graph replays, L2 flushed by a read) with split
counts around the planned one.

    python perf/exp31.py [--quick] [--no-check] [--product]

Outcome (H100; perf/logs/exp31a_h100.log, perf/logs/exp31b_h100.log, copy
3018 GB/s): A passed at the first try (9 batches x 4 split counts). B=16 x
8k: 126.0 us (Triton) -> 120.6 us with the Gluon decode unsplit (92.4 %);
2 splits 127.8 us. B=1 x 32k: 40.0 -> 39.8 us at 16 splits (38.9 us, 71.4 %
in the first run). One program streams at most ~55 GB/s, so ~64 programs
saturate HBM: B = 1 / 2 / 4 / 8 / 16 were each fastest at ~64 programs;
B=32 x 8k level with Triton; B=64 x 4k and 62 x 4k 1-2 % slower (one
program per SM). 5-tile rings and 128-key tiles no better. Kept for
launches of <= num_sms // 2 programs (launch.plan_gluon_decode).
"""

from __future__ import annotations

import sys
import traceback

import torch

from diffkv.bench import SCENARIOS, Scenario, as_graph, build_batch, measure_ceilings, time_fn, workload
from diffkv.testing import BatchSpec, make_batch
from diffkv.triton.kernels import attention as tk
from diffkv.triton.kernels import decode_gluon as dg
from tests.test_decode_gluon import SCENARIOS as DECODE_SCENARIOS
from tests.triton_common import check_output, run_kernel

CASES = DECODE_SCENARIOS  # the GPU tests' named batches (tests/test_decode_gluon.py)


def part_a() -> int:
    calls = []
    real = dg.decode

    def counted(*a, **k):
        calls.append(k["num_splits"])
        return real(*a, **k)

    dg.decode = counted
    fails = 0
    for name, (seqs, over, feats) in CASES.items():
        base = dict(seqs=seqs, num_heads=32, num_kv_heads=4, head_size=192, head_size_v=128, block_size=16,
                    dtype=torch.bfloat16, padding_rows=3, seed=5)
        base.update(over)
        batch = make_batch(BatchSpec(**base), feats, device="cuda")
        for ns in (None, 1, 3, 7):
            calls.clear()
            try:
                out = run_kernel(batch, num_splits=ns)
                torch.cuda.synchronize()
                assert calls, "the Gluon decode did not run"
                check_output(out, batch, what=f"gluon decode {name} splits={ns}")
                print(f"A {name:16s} splits={ns!s:4s} ran {calls} PASS", flush=True)
            except Exception as e:  # noqa: BLE001
                fails += 1
                print(f"A {name:16s} splits={ns!s:4s} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
    dg.decode = real
    return fails


def _time(name, s, b, ws, ceil, kernel, ns, ref, label=""):
    c = b.common
    nbytes, _ = workload(s)
    tk._USE_GLUON_DECODE = kernel == "gluon"

    def fn():
        tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor,
                           b.out, scale=192 ** -0.5, max_query_len=c.max_query_len,
                           max_seq_len=c.max_seq_len, workspace=ws, num_splits=ns)
    try:
        fn()
        torch.cuda.synchronize()
        o = b.out.float().clone()
        ref = o if ref is None else ref
        ms, p20, p80 = time_fn(as_graph(fn) or fn, reps_ms=100)
        print(f"B {name:15s} {kernel:6s} {label:10s} splits={ns!s:4s} {ms * 1e3:7.1f} us "
              f"[{p20 * 1e3:.1f}, {p80 * 1e3:.1f}] {nbytes / ms / 1e6 / ceil['copy_GBps']:6.1%} of copy  "
              f"maxdiff vs triton {(o - ref).abs().max().item():.1e} nan {bool(o.isnan().any())}", flush=True)
    except Exception:  # noqa: BLE001
        print(f"B {name} {kernel} {label} splits={ns} FAILED", flush=True)
        traceback.print_exc()
    return ref


def part_b(quick: bool) -> None:
    dev = torch.device("cuda")
    ceil = measure_ceilings(dev)
    print(torch.cuda.get_device_name(), {k: round(v, 1) for k, v in ceil.items()}, flush=True)
    ws = tk.Workspace.allocate(8192, 32, 128, dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    extra = {f"decode_b{n}_{k}k": Scenario(f"decode_b{n}_{k}k", ((n, 1, k * 1024 - 1),), "decode")
             for n, k in ((4, 8), (8, 8), (32, 8), (2, 32))}
    scen = {**{k: SCENARIOS[k] for k in ("decode_b1_32k", "decode_b16_8k", "decode_b64_4k", "mixed.decode_part")},
            **extra}
    if quick:
        scen = {k: scen[k] for k in ("decode_b1_32k", "decode_b16_8k")}
    variants = {"bn64x4": (64, 256), "bn64x5": (64, 320), "bn128x2": (128, 256)}
    if "--product" in sys.argv:  # the product's tiles and ring only (a split-count sweep, e.g. on another card)
        variants = {"bn64x4": (64, 256)}
    for name, s in scen.items():
        b = build_batch(s, dev)
        progs = len(s.seq_list()) * s.num_kv_heads
        ref = _time(name, s, b, ws, ceil, "triton", None, None)
        cand = sorted({1} | {max(1, round(t / progs)) for t in (16, 32, 48, 64, 96, 128, sms) if t >= progs * 0.75})
        for label, (bn, ring) in variants.items():
            dg.BLOCK_N, dg.RING_KEYS = bn, ring
            for ns in cand:
                _time(name, s, b, ws, ceil, "gluon", ns, ref, label)
        dg.BLOCK_N, dg.RING_KEYS = 64, 256
        del b
        torch.cuda.empty_cache()
    tk._USE_GLUON_DECODE = True


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    fails = 0 if "--no-check" in sys.argv else part_a()
    print(f"A: {fails} failures", flush=True)
    part_b(quick)
