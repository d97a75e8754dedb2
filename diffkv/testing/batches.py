"""Concrete test batches: a readable description in, ready tensors out.

A :class:`BatchSpec` names the shape of a step (sequences, heads, head sizes,
block size, dtype); a :class:`LayerFeatures` names the layer's optional
features. :func:`make_batch` turns them into tensors laid out exactly as an
engine would, with traps for sloppy kernels:

* physical blocks in a random permutation (``permute_blocks``);
* unused cache blocks and the tail of each sequence's last block filled with
  NaN (``poison_cache``) -- a kernel that reads past ``seq_len`` without a
  mask turns its output into NaN;
* block-table columns past a sequence's blocks set to an out-of-range id
  (``poison_block_table``) -- a kernel must mask those loads;
* output rows past ``query_start_loc[-1]`` (``padding_rows``) prefilled with
  NaN -- they must stay NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

BAD_BLOCK_ID = 2**30
"""Value put in unused block-table columns; any dereference is out of bounds."""


@dataclass(frozen=True)
class SeqShape:
    """One sequence of a step: ``q_len`` new tokens after ``context_len`` cached ones."""

    q_len: int
    context_len: int

    @property
    def seq_len(self) -> int:
        return self.context_len + self.q_len

    @property
    def kind(self) -> str:
        if self.q_len == 0:
            return "empty"
        if self.context_len == 0:
            return "full_prefill"
        if self.q_len == 1:
            return "decode"
        if self.q_len <= 8:
            return "multi_token_decode"
        return "chunked_prefill"


@dataclass(frozen=True)
class LayerFeatures:
    """Optional features of one layer (SPEC section 2). ``alibi`` is None,
    ``"linear"`` or ``"sqrt"``."""

    sliding_window: int | None = None
    softcap: float | None = None
    alibi: str | None = None
    sinks: bool = False
    scale: float | None = None  # None = Dqk ** -0.5

    def names(self) -> list[str]:
        """Feature names as in :class:`diffkv.Feature`."""
        out = []
        if self.sliding_window is not None:
            out.append("sliding_window")
        if self.softcap is not None:
            out.append("softcap")
        if self.alibi == "linear":
            out.append("alibi")
        if self.alibi == "sqrt":
            out.append("alibi_sqrt")
        if self.sinks:
            out.append("sinks")
        return out


@dataclass(frozen=True)
class BatchSpec:
    """Shape of one step."""

    seqs: tuple[SeqShape, ...]
    num_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 64
    head_size_v: int = 32
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    padding_rows: int = 0
    extra_blocks: int = 2
    extra_block_table_cols: int = 1
    permute_blocks: bool = True
    poison_cache: bool = True
    poison_block_table: bool = True
    seed: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.q_len for s in self.seqs)

    def describe(self) -> str:
        seqs = ", ".join(f"(q={s.q_len}, ctx={s.context_len})" for s in self.seqs)
        return (
            f"H={self.num_heads} Hkv={self.num_kv_heads} Dqk={self.head_size} Dv={self.head_size_v} "
            f"block={self.block_size} {str(self.dtype).replace('torch.', '')} pad={self.padding_rows} seqs=[{seqs}]"
        )


@dataclass
class Batch:
    """Tensors of one step (all on one device).

    query [T_pad, H, Dqk], key [T_pad, Hkv, Dqk], value [T_pad, Hkv, Dv],
    kv_cache [num_blocks, block_size, Hkv, Dqk + Dv] (already holding every
    token, new ones included), query_start_loc [S + 1], seq_lens [S],
    block_table [S, max_blocks], slot_mapping [T_pad] (-1 on padding rows),
    out [T_pad, H, Dv] prefilled with NaN.
    """

    spec: BatchSpec
    features: LayerFeatures
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    out: torch.Tensor
    alibi_slopes: torch.Tensor | None
    sinks: torch.Tensor | None
    scale: float
    owned_rows: torch.Tensor = field(repr=False)  # [T_pad] bool

    def attention_kwargs(self) -> dict:
        """Keyword arguments of :func:`diffkv.paged_attention` for this batch."""
        f = self.features
        return dict(
            scale=self.scale,
            sliding_window=f.sliding_window,
            softcap=f.softcap,
            alibi_slopes=self.alibi_slopes,
            use_alibi_sqrt=f.alibi == "sqrt",
            sinks=self.sinks,
        )

    def impl_kwargs(self) -> dict:
        """Constructor arguments of a backend impl for this layer."""
        f = self.features
        s = self.spec
        return dict(
            num_heads=s.num_heads,
            head_size=s.head_size,
            scale=self.scale,
            num_kv_heads=s.num_kv_heads,
            alibi_slopes=self.alibi_slopes,
            sliding_window=f.sliding_window,
            kv_cache_dtype="auto",
            logits_soft_cap=f.softcap,
            sinks=self.sinks,
            use_alibi_sqrt=f.alibi == "sqrt",
            head_size_v=s.head_size_v,
        )

    def fresh_out(self) -> torch.Tensor:
        return torch.full_like(self.out, float("nan"))

    def reproducer(self) -> str:
        """A one-line description a person can paste into a bug report."""
        return f"BatchSpec({self.spec.describe()}), {self.features}"

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return Batch(**moved)


def alibi_slopes_for(num_heads: int) -> torch.Tensor:
    """The usual geometric ALiBi slopes (fp32 [H])."""
    n = 2 ** math.floor(math.log2(num_heads))
    base = [2 ** (-8.0 * (i + 1) / n) for i in range(n)]
    extra = [2 ** (-4.0 * (2 * i + 1) / n) for i in range(num_heads - n)]
    return torch.tensor(base + extra, dtype=torch.float32)


def make_batch(
    spec: BatchSpec,
    features: LayerFeatures = LayerFeatures(),
    device: torch.device | str = "cpu",
) -> Batch:
    """Random tensors for ``spec`` (deterministic in ``spec.seed``)."""
    g = torch.Generator().manual_seed(spec.seed)
    H, Hkv, Dqk, Dv, BS = spec.num_heads, spec.num_kv_heads, spec.head_size, spec.head_size_v, spec.block_size
    S = len(spec.seqs)
    T = spec.num_tokens
    T_pad = T + spec.padding_rows
    blocks_per_seq = [math.ceil(s.seq_len / BS) for s in spec.seqs]
    used_blocks = sum(blocks_per_seq)
    num_blocks = used_blocks + spec.extra_blocks
    max_blocks = max(blocks_per_seq, default=0) + spec.extra_block_table_cols

    ids = torch.randperm(num_blocks, generator=g) if spec.permute_blocks else torch.arange(num_blocks)
    fill = BAD_BLOCK_ID if spec.poison_block_table else 0
    block_table = torch.full((max(S, 1) if S else 0, max(max_blocks, 1)), fill, dtype=torch.int32)
    block_table = block_table[:S]
    nxt = 0
    for s, nb in enumerate(blocks_per_seq):
        block_table[s, :nb] = ids[nxt : nxt + nb].to(torch.int32)
        nxt += nb

    gen_dtype = torch.float64 if spec.dtype == torch.float64 else torch.float32
    kv_cache = torch.randn(num_blocks, BS, Hkv, Dqk + Dv, generator=g, dtype=gen_dtype).to(spec.dtype)
    if spec.poison_cache and spec.dtype.is_floating_point:
        poison = torch.ones(num_blocks, BS, dtype=torch.bool)
        for s, seq in enumerate(spec.seqs):
            j = torch.arange(seq.seq_len)
            poison[block_table[s, j // BS].long(), j % BS] = False
        kv_cache[poison] = float("nan")

    query = torch.randn(T_pad, H, Dqk, generator=g, dtype=gen_dtype).to(spec.dtype)
    key = torch.randn(T_pad, Hkv, Dqk, generator=g, dtype=gen_dtype).to(spec.dtype)
    value = torch.randn(T_pad, Hkv, Dv, generator=g, dtype=gen_dtype).to(spec.dtype)
    slot_mapping = torch.full((T_pad,), -1, dtype=torch.int64)
    qsl = [0]
    for s, seq in enumerate(spec.seqs):
        start = qsl[-1]
        for i in range(seq.q_len):
            j = seq.context_len + i
            slot = int(block_table[s, j // BS]) * BS + j % BS
            slot_mapping[start + i] = slot
            # the cache already holds the new tokens: key/value agree with it
            key[start + i] = kv_cache[slot // BS, slot % BS, :, :Dqk]
            value[start + i] = kv_cache[slot // BS, slot % BS, :, Dqk:]
        qsl.append(start + seq.q_len)
    owned = torch.zeros(T_pad, dtype=torch.bool)
    owned[:T] = True

    alibi = alibi_slopes_for(H) if features.alibi is not None else None
    sinks = (torch.randn(H, generator=g) * 2).to(torch.float32) if features.sinks else None
    scale = features.scale if features.scale is not None else Dqk**-0.5
    batch = Batch(
        spec=spec,
        features=features,
        query=query,
        key=key,
        value=value,
        kv_cache=kv_cache,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor([s.seq_len for s in spec.seqs], dtype=torch.int32),
        block_table=block_table,
        slot_mapping=slot_mapping,
        out=torch.full((T_pad, H, Dv), float("nan"), dtype=spec.dtype),
        alibi_slopes=alibi,
        sinks=sinks,
        scale=scale,
        owned_rows=owned,
    )
    return batch.to(device) if torch.device(device).type != "cpu" else batch


def with_dtype(spec: BatchSpec, dtype: torch.dtype) -> BatchSpec:
    return replace(spec, dtype=dtype)
