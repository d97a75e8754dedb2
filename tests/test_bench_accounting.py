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
