"""The Triton backend behind the shared interface (SPEC section 3).

* :class:`TritonBackend` -- name ``"TRITON_DIFFKV"``, capabilities as data,
  :meth:`TritonBackend.validate_configuration` returning every reason, and
  direct functional entry points (``paged_attention`` / ``write_kv_cache``)
  used by ``diffkv.paged_attention(..., backend="triton")``.
* :class:`TritonImpl` -- one attention layer: the cache writer and the
  attention launch. Argument checks happen once in
  :class:`diffkv.interface.DiffKVImpl`; the hooks here only launch.
* :class:`TritonMetadataBuilder` -- preallocates the split-KV workspace
  (partial outputs sized by ``head_size_v``, not ``head_size``) once, so the
  forward allocates nothing and never syncs with the host: it is capturable
  in a CUDA graph and replayable with new metadata values.
"""

from __future__ import annotations

import torch

from diffkv.interface import BackendCapabilities, DiffKVBackend, DiffKVImpl, Feature
from diffkv.metadata import CommonAttentionMetadata, DiffKVMetadata, DiffKVMetadataBuilder, KVCacheSpec
from diffkv.triton import launch
from diffkv.triton.kernels import attention as _attention
from diffkv.triton.kernels import cache_writer as _cache_writer
from diffkv.triton.kernels.attention import Workspace


class TritonMetadataBuilder(DiffKVMetadataBuilder):
    """Builds :class:`DiffKVMetadata` whose ``workspace`` is this builder's
    preallocated split-KV scratch (:class:`Workspace`).

    The workspace holds ``launch.split_rows_capacity(max_num_batched_tokens)``
    (query token x split) rows of ``num_heads x head_size_v`` fp32 partial
    outputs and, on Hopper (or the interpreter) with a 16-bit cache, a K/V
    gather buffer of
    ``launch.gather_rows_capacity(max_num_batched_tokens)`` token rows for the
    prefill path through tensor descriptors; it is allocated here, once, and
    reused by every build -- except where the Gluon prefill kernel may serve
    the layer shape (sm_90, bf16/fp16, 192/128, pages of 16-128): it reads
    the pages in place, so the buffer (84 MB at Hkv=4) is deferred until a
    prefill goes to the Triton kernel (window, softcap, ALiBi, a strided
    cache; :meth:`Workspace.ensure_kv_rows`).
    """

    def __init__(self, kv_cache_spec: KVCacheSpec, device: torch.device | str, *, num_blocks: int | None = None,
                 validate: bool = True) -> None:
        super().__init__(kv_cache_spec, device, num_blocks=num_blocks, validate=validate)
        spec = kv_cache_spec
        rows = launch.split_rows_capacity(spec.max_num_batched_tokens)
        # K/V gather buffer for the prefill path through tensor descriptors
        # (Hopper and later, 16-bit caches): launch.gather_rows_capacity rows
        kv_rows = 0
        on_tma = _attention.INTERPRETED or (self.device.type == "cuda"
                                            and launch.device_arch(self.device, False)[0] == "sm90")
        if on_tma and spec.dtype in (torch.float16, torch.bfloat16):
            kv_rows = launch.gather_rows_capacity(spec.max_num_batched_tokens)
        # where the Gluon prefill kernel (pages read in place) may serve every
        # prefill, the buffer waits for the first prefill that needs it
        defer = _attention.gluon_may_serve(self.device, head_size=spec.head_size, head_size_v=spec.head_size_v,
                                           block_size=spec.block_size, dtype=spec.dtype)
        self.workspace = Workspace.allocate(rows, spec.num_heads, spec.head_size_v, self.device, kv_rows=kv_rows,
                                            kv_row_width=spec.num_kv_heads * (spec.head_size + spec.head_size_v),
                                            kv_dtype=spec.dtype, kv_seqs=spec.max_num_seqs, defer_kv=defer)

    def make_workspace(self, common: CommonAttentionMetadata) -> Workspace:
        return self.workspace

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DiffKVMetadata:
        """As the base builder, plus ``extra["num_decode_seqs"]``: how many
        sequences have at most ``launch.DECODE_MAX_QUERY_LEN`` new tokens,
        counted on the host copy of ``query_start_loc`` when there is one (a
        mixed batch then runs decodes and prefills with their own tiles)."""
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        qsl = common_attn_metadata.query_start_loc_cpu
        if qsl is not None and qsl.device.type == "cpu":
            n = common_attn_metadata.num_reqs
            q_lens = qsl[1 : n + 1] - qsl[:n]
            is_decode = q_lens <= launch.DECODE_MAX_QUERY_LEN
            md.extra["num_decode_seqs"] = int(is_decode.sum())
            md.extra["max_decode_query_len"] = int(q_lens[is_decode].max()) if is_decode.any() else 0
        return md


class TritonImpl(DiffKVImpl):
    """Triton kernels for one layer.

    Attributes:
        num_splits: force the KV split count (None = launch heuristics);
            for tests and tuning.
    """

    num_splits: int | None = None

    def _write_kv_cache(self, key, value, kv_cache, slot_mapping) -> None:
        _cache_writer.write_kv_cache(key, value, kv_cache, slot_mapping)

    def _attention(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: DiffKVMetadata,
                   output: torch.Tensor) -> None:
        slopes, sinks = self._params_on(query.device)
        n = metadata.num_reqs or metadata.seq_lens.shape[0]
        workspace = metadata.workspace if isinstance(metadata.workspace, Workspace) else None
        _attention.paged_attention(
            query,
            kv_cache,
            metadata.query_start_loc[: n + 1],
            metadata.seq_lens[:n],
            metadata.block_table,
            output,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.logits_soft_cap,
            alibi_slopes=slopes,
            use_alibi_sqrt=self.use_alibi_sqrt,
            sinks=sinks,
            max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len,
            workspace=workspace,
            num_splits=self.num_splits,
            num_decode_seqs=metadata.extra.get("num_decode_seqs") if self.num_splits is None else None,
            max_decode_query_len=metadata.extra.get("max_decode_query_len"),
        )


class TritonBackend(DiffKVBackend):
    """Triton kernels: every feature of SPEC section 2, fp16/bf16/fp32, any
    multiple-of-16 block size up to 256, Dqk and Dv independent multiples of
    16 from 32 to 256, CUDA-graph capturable forward. Runs on CUDA, and on the
    CPU through the Triton interpreter (TRITON_INTERPRET=1 set before triton
    is imported; slow, for tests)."""

    name = "TRITON_DIFFKV"
    capabilities = BackendCapabilities(
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        kv_cache_dtypes=("auto",),
        block_size_multiple=16,
        max_block_size=256,
        head_sizes=tuple(range(32, 257, 16)),
        head_sizes_v=tuple(range(32, 257, 16)),
        features=frozenset(Feature.ALL),
        devices=("cuda", "cpu"),
    )

    @classmethod
    def get_impl_cls(cls) -> type[TritonImpl]:
        return TritonImpl

    @classmethod
    def get_builder_cls(cls) -> type[TritonMetadataBuilder]:
        return TritonMetadataBuilder

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        """Every reason the configuration is unsupported (see
        :meth:`DiffKVBackend.validate_configuration`), plus: CPU tensors need
        the Triton interpreter."""
        reasons = super().validate_configuration(**kwargs)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu" and not _attention.INTERPRETED:
            reasons.append(
                f"device='cpu': {cls.name} runs on CPU tensors only in the Triton interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported); use a CUDA device or backend='reference'"
            )
        return reasons

    # -- direct functional entry points ------------------------------------
    @classmethod
    def paged_attention(
        cls,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
        use_alibi_sqrt: bool = False,
        sinks: torch.Tensor | None = None,
        out: torch.Tensor,
        num_splits: int | None = None,
    ) -> torch.Tensor:
        """Kernel launch without impl/builder objects (shapes already checked
        by :func:`diffkv.paged_attention`). Tile sizes and the split count come
        from the query lengths (read on the host) and the block-table width;
        the split workspace is allocated here, for this call only (the class
        API preallocates it instead)."""
        dev = query.device
        if alibi_slopes is not None:
            alibi_slopes = alibi_slopes.to(dev, torch.float32).contiguous()
        if sinks is not None:
            sinks = sinks.to(dev, torch.float32).contiguous()
        T, H, Dqk = query.shape
        Dv = kv_cache.shape[3] - Dqk
        q_lens = (query_start_loc[1:] - query_start_loc[:-1]).cpu()
        max_q = int(q_lens.max()) if q_lens.numel() else 0
        decode_q_lens = q_lens[q_lens <= launch.DECODE_MAX_QUERY_LEN]
        # plan once, with the same hints the launcher gets, to size this call's workspace
        budget = max(1, launch.split_rows_capacity(T) // max(1, T))
        plan = _attention.plan_for(query, kv_cache, seq_lens, block_table, max_query_len=max_q, num_splits=num_splits,
                                   max_splits=budget, sliding_window=sliding_window)
        # K/V rows gathered for the prefill descriptor path (sm_90+, 16-bit):
        # room for the served sequences at the longest length (the launcher's
        # bound), from the host copy of seq_lens
        kv_rows = 0
        max_seq = int(seq_lens.max().cpu()) if seq_lens.numel() else 0
        on_tma = _attention.INTERPRETED or (dev.type == "cuda" and launch.device_arch(dev, False)[0] == "sm90")
        if on_tma and query.dtype in (torch.float16, torch.bfloat16) and max_q > launch.DECODE_MAX_QUERY_LEN:
            n_dec = int(decode_q_lens.numel())
            served = q_lens.numel() - n_dec if 0 < n_dec < q_lens.numel() else q_lens.numel()
            kv_rows = served * max_seq
        # split scratch for whichever decode kernel the launcher picks (each
        # plans its own split count within the workspace's capacity)
        split_rows = T * budget if plan.num_splits > 1 or max_q <= launch.DECODE_MAX_QUERY_LEN else 0
        workspace = None
        if split_rows > 0 or kv_rows > 0:
            workspace = Workspace.allocate(split_rows, H, Dv, dev,
                                           kv_rows=kv_rows, kv_row_width=kv_cache.shape[2] * kv_cache.shape[3],
                                           kv_dtype=kv_cache.dtype, kv_seqs=q_lens.numel(),
                                           defer_kv=True)  # allocated only if the Triton prefill needs it
        return _attention.paged_attention(
            query, kv_cache, query_start_loc, seq_lens, block_table, out, scale=scale,
            sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes,
            use_alibi_sqrt=use_alibi_sqrt, sinks=sinks, workspace=workspace, num_splits=num_splits,
            max_query_len=max_q, max_seq_len=max_seq, num_decode_seqs=int(decode_q_lens.numel()),
            max_decode_query_len=int(decode_q_lens.max()) if decode_q_lens.numel() else 0,
        )

    @classmethod
    def write_kv_cache(cls, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
        """Cache-writer kernel launch (shapes already checked)."""
        _cache_writer.write_kv_cache(key, value, kv_cache, slot_mapping)


TritonImpl.backend = TritonBackend
