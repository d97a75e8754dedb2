"""The reference backend behind the shared interface."""

from __future__ import annotations

import torch

from diffkv.interface import BackendCapabilities, DiffKVBackend, DiffKVImpl, Feature
from diffkv.metadata import DiffKVMetadata
from diffkv.reference.attention import paged_attention
from diffkv.reference.cache import write_kv_cache


class ReferenceImpl(DiffKVImpl):
    def _write_kv_cache(self, key, value, kv_cache, slot_mapping) -> None:
        write_kv_cache(key, value, kv_cache, slot_mapping)

    def _attention(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: DiffKVMetadata,
                   output: torch.Tensor) -> None:
        slopes, sinks = self._params_on(query.device)
        n = metadata.num_reqs or metadata.seq_lens.shape[0]
        paged_attention(
            query,
            kv_cache,
            metadata.query_start_loc[: n + 1],
            metadata.seq_lens[:n],
            metadata.block_table,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.logits_soft_cap,
            alibi_slopes=slopes,
            use_alibi_sqrt=self.use_alibi_sqrt,
            sinks=sinks,
            out=output,
        )


class ReferenceBackend(DiffKVBackend):
    """Plain PyTorch; runs anywhere torch runs. Every feature, fp16/bf16/fp32
    (and fp64, for oracle checks)."""

    name = "REFERENCE_DIFFKV"
    capabilities = BackendCapabilities(
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        features=frozenset(Feature.ALL) - {Feature.CUDA_GRAPH},
        devices=("cpu", "cuda"),
    )

    @classmethod
    def get_impl_cls(cls):
        return ReferenceImpl

    @classmethod
    def paged_attention(cls, query, kv_cache, query_start_loc, seq_lens, block_table, **kwargs):
        return paged_attention(query, kv_cache, query_start_loc, seq_lens, block_table, **kwargs)

    @classmethod
    def write_kv_cache(cls, key, value, kv_cache, slot_mapping) -> None:
        write_kv_cache(key, value, kv_cache, slot_mapping)


ReferenceImpl.backend = ReferenceBackend
