"""The benchmark's byte/FLOP accounting (what the performance claims rest on)
against a brute-force count, and against SPEC section 8's own figures."""

from __future__ import annotations

import pytest

from diffkv.bench import SCENARIOS, needed_keys, parse_seqs, workload


@pytest.mark.parametrize("q_len,ctx,window", [(1, 0, None), (5, 7, None), (1, 300, 128), (9, 3, 4), (4, 0, 2),
                                              (0, 5, None)])
def test_needed_keys_brute_force(q_len, ctx, window):
    keys, pairs = set(), 0
    for i in range(q_len):
        p = ctx + i
        for j in range(p + 1):
            if window is None or p - j < window:
                keys.add(j)
                pairs += 1
    assert needed_keys(q_len, ctx, window) == (len(keys), pairs)


# (scenario, SPEC ms, SPEC GB/s or TFLOP/s): bytes or FLOPs implied by the SPEC table
SPEC_FIGURES = [
    ("decode_b1_32k", 0.218, 385e9, "bytes"),
    ("decode_b16_8k", 0.188, 1784e9, "bytes"),
    ("decode_b64_4k", 0.312, 2157e9, "bytes"),
    ("decode_b256_2k", 0.481, 2803e9, "bytes"),
    ("decode_b64_8k_win128_sinks", 0.049, 886e9, "bytes"),
    ("prefill_1x8k", 10.06, 68e12, "flops"),
    ("prefill_4x2k", 2.63, 65e12, "flops"),
    ("mixed_2kchunk_62dec", 2.14, 62.5e12, "flops"),
]


@pytest.mark.parametrize("name,ms,rate,what", SPEC_FIGURES)
def test_accounting_matches_spec_figures(name, ms, rate, what):
    nbytes, flops = workload(SCENARIOS[name])
    implied = ms * 1e-3 * rate
    mine = nbytes if what == "bytes" else flops
    assert abs(mine - implied) / implied < 0.03, (mine, implied)


def test_parse_seqs():
    assert parse_seqs("1x2048@2048, 62x1@4096") == ((1, 2048, 2048), (62, 1, 4096))
    with pytest.raises(SystemExit, match="N x Q @ CTX"):
        parse_seqs("banana")


def test_window_verdict_is_bound_by_the_window_not_the_context():
    """Issue #6's windowed decode target: faster than reading the whole
    context at the copy ceiling (so it cannot be reading it) -> MET; slower
    -> miss. The bound is the scenario's bytes without its window."""
    from dataclasses import asdict

    from diffkv.bench import SCENARIOS, verdict, whole_context_read_ms, workload

    s = SCENARIOS["decode_b64_8k_win128_sinks"]
    ceilings = {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 700.0}
    r = {"scenario": s.name, "kind": s.kind, "config": asdict(s), "frac_copy": 0.5}
    # 64 sequences x 8192 keys x 8 KV heads x 320 values x 2 bytes (+ q and out), read at 3000 GB/s
    whole = whole_context_read_ms(r, ceilings["copy_GBps"])
    expected_bytes = 64 * 8192 * 8 * 320 * 2 + 64 * 32 * 320 * 2
    assert abs(whole - expected_bytes / 3000e9 * 1e3) < 1e-9
    assert workload(s)[0] * 50 < expected_bytes  # the window's bytes are a small part of it
    assert verdict({**r, "ms_median": 0.03}, ceilings).startswith("MET")
    assert verdict({**r, "ms_median": whole * 1.01}, ceilings).startswith("miss")
    # without the ceilings (or without a window) the plain decode rule applies
    assert verdict({**r, "ms_median": 0.03}).startswith("miss (>= 90% copy)")


def test_table_names_the_kernels_each_scenario_launched(capsys):
    """The bench prints, under its table, the kernels one forward of each
    scenario launched (recorded by the Triton backend's launch trace);
    scenarios without a record (older JSON, other backends) are left out."""
    from diffkv.bench import print_table

    row = dict(kind="prefill", note="", config={}, ms_median=0.3, ms_p20=0.29, ms_p80=0.31, GBps=1.0, TFLOPs=500.0,
               torch_baseline_ms=None, frac_floor=None, timing="cuda_graph_replay", frac_copy=0.1, frac_matmul=0.7)
    report = {"gpu": "test card", "backend": "triton", "flush": "read",
              "ceilings": {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 700.0},
              "results": [dict(row, scenario="prefill_4x2k", kernels=["gluon prefill"]),
                          dict(row, scenario="old_row")]}
    print_table(report)
    out = capsys.readouterr().out
    assert "kernels launched by one forward:" in out
    assert [line.split() for line in out.splitlines() if line.startswith("  ")] == [
        ["prefill_4x2k", "gluon", "prefill"]]
