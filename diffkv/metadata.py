"""Attention metadata and the metadata builder (vLLM v1 style).

The engine describes a batch with :class:`CommonAttentionMetadata`; a
backend's builder turns it into that backend's :class:`DiffKVMetadata`
once per step, checking the values from host copies (never in the forward),
and attaching any scratch the backend needs (e.g. split-KV partial buffers,
sized by ``head_size_v``, preallocated once so the forward allocates
nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from diffkv import validation


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-layer-group cache description handed to a builder.

    Attributes:
        block_size: tokens per cache block.
        num_kv_heads: KV heads (Hkv).
        num_heads: query heads (H).
        head_size: Dqk.
        head_size_v: Dv (per layer; may differ between layers).
        dtype: model dtype.
        max_num_seqs: largest batch the builder must serve (scratch sizing).
        max_num_batched_tokens: largest number of query tokens per step.
    """

    block_size: int
    num_kv_heads: int
    num_heads: int
    head_size: int
    head_size_v: int
    dtype: torch.dtype = torch.bfloat16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192


@dataclass
class CommonAttentionMetadata:
    """Backend-independent description of one step's batch.

    Shapes: ``query_start_loc [S+1]`` int32, ``seq_lens [S]`` int32,
    ``block_table_tensor [S, max_blocks]`` int32, ``slot_mapping [T]`` int64.
    ``*_cpu`` fields are host copies of the same values (optional; taken from
    the device tensors when missing, which costs a sync in ``build``).
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table_tensor: torch.Tensor
    slot_mapping: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None
    causal: bool = True

    @classmethod
    def from_seq_lens(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_table: torch.Tensor,
        slot_mapping: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> CommonAttentionMetadata:
        """Convenience constructor from python lists (tests, demos)."""
        device = torch.device(device) if device is not None else block_table.device
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        qsl_cpu = torch.tensor(qsl, dtype=torch.int32)
        sl_cpu = torch.tensor(seq_lens, dtype=torch.int32)
        if slot_mapping is None:
            slot_mapping = torch.full((qsl[-1],), -1, dtype=torch.int64)
        return cls(
            query_start_loc=qsl_cpu.to(device),
            seq_lens=sl_cpu.to(device),
            block_table_tensor=block_table.to(device, torch.int32),
            slot_mapping=slot_mapping.to(device),
            num_reqs=len(seq_lens),
            num_actual_tokens=qsl[-1],
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=sl_cpu,
        )


@dataclass
class DiffKVMetadata:
    """What a diffkv impl's forward reads. Device tensors plus host scalars.

    ``workspace`` holds backend-specific scratch (e.g. the Triton backend's
    split-KV partial buffers); the reference backend leaves it ``None``.
    """

    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # [S+1] int32
    max_seq_len: int
    seq_lens: torch.Tensor  # [S] int32
    block_table: torch.Tensor  # [S, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    num_reqs: int = 0
    use_cascade: bool = False
    common_prefix_len: int = 0
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None
    workspace: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class DiffKVMetadataBuilder:
    """Builds :class:`DiffKVMetadata` from :class:`CommonAttentionMetadata`.

    Values are checked here (host copies), so the forward need not. Backends
    that need scratch override :meth:`make_workspace`.
    """

    def __init__(self, kv_cache_spec: KVCacheSpec, device: torch.device | str, *, num_blocks: int | None = None,
                 validate: bool = True) -> None:
        self.kv_cache_spec = kv_cache_spec
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        self.validate = validate

    def make_workspace(self, common: CommonAttentionMetadata) -> Any:
        """Backend scratch attached to the metadata (None by default)."""
        return None

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> DiffKVMetadata:
        """``common_prefix_len`` > 0 would enable cascade attention in vLLM;
        diffkv never uses cascade, so the batch is computed without it (same
        result) and ``use_cascade`` stays False."""
        c = common_attn_metadata
        if self.validate:
            qsl_cpu = c.query_start_loc_cpu if c.query_start_loc_cpu is not None else c.query_start_loc
            sl_cpu = c.seq_lens_cpu if c.seq_lens_cpu is not None else c.seq_lens
            if c.block_table_tensor.dtype != torch.int32:
                raise validation.MetadataError(
                    f"block_table_tensor has dtype {c.block_table_tensor.dtype}; expected torch.int32"
                )
            for name, t in (("query_start_loc", c.query_start_loc), ("seq_lens", c.seq_lens)):
                if t.dtype != torch.int32:
                    raise validation.MetadataError(f"{name} has dtype {t.dtype}; expected torch.int32")
            max_q, max_s = validation.check_metadata_values(
                qsl_cpu,
                sl_cpu,
                c.block_table_tensor[: c.num_reqs],
                num_tokens=c.num_actual_tokens,
                block_size=self.kv_cache_spec.block_size,
                num_blocks=self.num_blocks,
            )
            if int(qsl_cpu[-1]) != c.num_actual_tokens:
                raise validation.MetadataError(
                    f"num_actual_tokens={c.num_actual_tokens} but query_start_loc[-1]={int(qsl_cpu[-1])}; "
                    "expected them equal"
                )
            if max_q > c.max_query_len or max_s > c.max_seq_len:
                raise validation.MetadataError(
                    f"max_query_len={c.max_query_len}, max_seq_len={c.max_seq_len} but the batch has "
                    f"query lengths up to {max_q} and seq_lens up to {max_s}; expected upper bounds"
                )
        return DiffKVMetadata(
            num_actual_tokens=c.num_actual_tokens,
            max_query_len=c.max_query_len,
            query_start_loc=c.query_start_loc,
            max_seq_len=c.max_seq_len,
            seq_lens=c.seq_lens,
            block_table=c.block_table_tensor,
            slot_mapping=c.slot_mapping,
            num_reqs=c.num_reqs,
            use_cascade=False,
            common_prefix_len=0,
            query_start_loc_cpu=c.query_start_loc_cpu,
            seq_lens_cpu=c.seq_lens_cpu,
            workspace=self.make_workspace(c),
        )
