"""The benchmark's read floor (diffkv.read_floor) reads exactly the K/V a
decode needs -- every needed value once, nothing else -- whatever the launch
configuration: values it must not touch are NaN, so reading one shows."""

from __future__ import annotations

import pytest
import torch

from diffkv.bench import SCENARIOS, Scenario, first_tokens, needed_keys
from diffkv.read_floor import paged_read

BLOCK_SIZE = 4


def poisoned_batch(seq_lens: list[int], first: list[int], hkv: int = 2, width: int = 12, seed: int = 0):
    """A cache whose needed rows hold random values and everything else NaN,
    a permuted block table (padded with a page that is all NaN), and the
    expected sum."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(pages) + 3
    cache = torch.full((num_blocks, BLOCK_SIZE, hkv, width), float("nan"))
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(seq_lens), max(pages) + 1), int(perm[-1]), dtype=torch.int32)  # padding: a NaN page
    expected = 0.0
    used = 0
    for s, (n, f) in enumerate(zip(seq_lens, first)):
        for p in range(pages[s]):
            blk = int(perm[used])
            used += 1
            table[s, p] = blk
            for r in range(BLOCK_SIZE):
                tok = p * BLOCK_SIZE + r
                if f <= tok < n:
                    vals = torch.rand(hkv, width, generator=g)
                    cache[blk, r] = vals
                    expected += float(vals.double().sum())
    return cache, table, torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(first, dtype=torch.int32), expected


@pytest.mark.parametrize("programs_per_seq", [1, 2, 5])
@pytest.mark.parametrize("width", [12, 16])  # 8 + 4 split, and a power of two
def test_paged_read_reads_each_needed_value_once(programs_per_seq, width):
    seq_lens = [13, 1, 8, 30]
    first = [0, 0, 5, 21]  # a windowed decode starts inside a page
    cache, table, lens, firsts, expected = poisoned_batch(seq_lens, first, width=width)
    out = paged_read(cache, table, lens, firsts, programs_per_seq, stages=2)
    total = float(out.double().sum())
    assert total == pytest.approx(expected, rel=1e-5), (total, expected)


def test_first_tokens_follow_the_window():
    s = SCENARIOS["decode_b64_8k_win128_sinks"]
    assert set(first_tokens(s)) == {8191 + 1 - 128}
    assert set(first_tokens(SCENARIOS["decode_b1_32k"])) == {0}
    multi = Scenario("x", ((1, 3, 10),), "decode", sliding_window=4)
    assert first_tokens(multi) == [13 - needed_keys(3, 10, 4)[0]]
