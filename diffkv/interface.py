"""The backend contract shared by every diffkv backend (SPEC section 3).

Modelled on vLLM's v1 attention-backend contract so that a backend written
against it drops into vLLM with a thin adapter (see ``diffkv.vllm``):

* :class:`DiffKVBackend` -- static class: name, impl/builder classes, the
  packed KV-cache shape, capabilities *as data* (:class:`BackendCapabilities`)
  and :meth:`DiffKVBackend.validate_configuration`, which returns **every**
  reason a configuration is unsupported (empty list = supported).
* :class:`DiffKVImpl` -- one per attention layer: ``do_kv_cache_update`` and
  ``forward``. Subclasses implement two small hooks, ``_write_kv_cache`` and
  ``_attention``; argument checking lives here, once, for every backend.
* metadata (:mod:`diffkv.metadata`) and its builder.

Shapes (``T`` tokens, ``H`` query heads, ``Hkv`` KV heads, ``S`` sequences)::

    query      [T, H, Dqk]        key   [T, Hkv, Dqk]     value [T, Hkv, Dv]
    kv_cache   [num_blocks, block_size, Hkv, Dqk + Dv]    (any strides on dims 0-2)
    output     [T, H, Dv]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diffkv import validation
from diffkv.errors import UnsupportedConfigError

if TYPE_CHECKING:
    from diffkv.metadata import DiffKVMetadata


class Feature:
    """Names of optional features a backend may declare (SPEC section 2)."""

    SLIDING_WINDOW = "sliding_window"
    SOFTCAP = "softcap"
    ALIBI = "alibi"
    ALIBI_SQRT = "alibi_sqrt"
    SINKS = "sinks"
    GQA = "gqa"  # H != Hkv
    CUDA_GRAPH = "cuda_graph"  # forward capturable in a CUDA graph

    ALL: ClassVar[tuple[str, ...]] = (
        SLIDING_WINDOW,
        SOFTCAP,
        ALIBI,
        ALIBI_SQRT,
        SINKS,
        GQA,
        CUDA_GRAPH,
    )


DECODER = "decoder"
"""The only attention type diffkv implements (causal self-attention)."""


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do, as data. The conformance suite reads this.

    Attributes:
        dtypes: query/key/value/output dtypes.
        kv_cache_dtypes: accepted ``kv_cache_dtype`` strings ("auto" = same
            as the model dtype).
        block_size_multiple: block sizes must be a positive multiple of it.
        max_block_size: largest supported block size.
        head_sizes: supported Dqk values.
        head_sizes_v: supported Dv values.
        features: names from :class:`Feature`.
        devices: torch device types the backend runs on.
    """

    dtypes: tuple[torch.dtype, ...]
    kv_cache_dtypes: tuple[str, ...] = ("auto",)
    block_size_multiple: int = 16
    max_block_size: int = 256
    head_sizes: tuple[int, ...] = tuple(range(32, 257, 16))
    head_sizes_v: tuple[int, ...] = tuple(range(32, 257, 16))
    features: frozenset[str] = frozenset()
    devices: tuple[str, ...] = ("cpu", "cuda")

    def supports(self, feature: str) -> bool:
        return feature in self.features


QUANTIZED_CACHE_PREFIXES = ("fp8", "int8", "int4", "nvfp4", "mxfp4")


def is_quantized_kv_cache(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype != "auto" and kv_cache_dtype.startswith(QUANTIZED_CACHE_PREFIXES)


def is_per_token_head_quant(kv_cache_dtype: str) -> bool:
    return "per_token_head" in kv_cache_dtype


class DiffKVBackend:
    """Static description of a backend. Subclasses set the class attributes
    and point to their impl and builder classes."""

    name: ClassVar[str] = "abstract"
    capabilities: ClassVar[BackendCapabilities]
    accept_output_buffer: ClassVar[bool] = True

    # -- vLLM-style static API ------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return cls.name

    @classmethod
    def get_impl_cls(cls) -> type[DiffKVImpl]:
        raise NotImplementedError

    @classmethod
    def get_builder_cls(cls) -> type:
        from diffkv.metadata import DiffKVMetadataBuilder

        return DiffKVMetadataBuilder

    @classmethod
    def get_supported_dtypes(cls) -> list[torch.dtype]:
        return list(cls.capabilities.dtypes)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(cls.capabilities.head_sizes)

    @classmethod
    def supports_feature(cls, feature: str) -> bool:
        return cls.capabilities.supports(feature)

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
        *,
        head_size_v: int,
    ) -> tuple[int, int, int, int]:
        """Shape of one layer's packed cache:
        ``[num_blocks, block_size, num_kv_heads, head_size + head_size_v]``.

        ``head_size_v`` is keyword-only and per layer (never a class global).
        """
        for name, value in (
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_size", head_size),
            ("head_size_v", head_size_v),
        ):
            if not isinstance(value, int) or value <= 0:
                raise validation.InvalidInputError(
                    f"get_kv_cache_shape: {name}={value!r}; expected a positive int"
                )
        return (num_blocks, block_size, num_kv_heads, head_size + head_size_v)

    # -- functional entry points (used by diffkv.paged_attention) ----------
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
    ) -> torch.Tensor:
        """Attention through the class API (impl + builder). Backends with a
        direct kernel entry point override this; the default lets any backend
        written against the interface serve the functional API."""
        from diffkv.metadata import CommonAttentionMetadata, KVCacheSpec

        T, H, Dqk = query.shape
        NB, BS, Hkv, D = kv_cache.shape
        impl = cls.get_impl_cls()(
            num_heads=H, head_size=Dqk, scale=scale, num_kv_heads=Hkv, alibi_slopes=alibi_slopes,
            sliding_window=sliding_window, logits_soft_cap=softcap, sinks=sinks, use_alibi_sqrt=use_alibi_sqrt,
            head_size_v=D - Dqk,
        )
        qsl_cpu, sl_cpu = query_start_loc.cpu(), seq_lens.cpu()
        q_lens = qsl_cpu[1:] - qsl_cpu[:-1]
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_table_tensor=block_table,
            slot_mapping=torch.full((T,), -1, dtype=torch.int64, device=query.device),
            num_reqs=seq_lens.shape[0], num_actual_tokens=int(qsl_cpu[-1]),
            max_query_len=int(q_lens.max()) if q_lens.numel() else 0,
            max_seq_len=int(sl_cpu.max()) if sl_cpu.numel() else 0,
            query_start_loc_cpu=qsl_cpu, seq_lens_cpu=sl_cpu,
        )
        spec = KVCacheSpec(block_size=BS, num_kv_heads=Hkv, num_heads=H, head_size=Dqk, head_size_v=D - Dqk,
                           dtype=query.dtype, max_num_seqs=max(1, seq_lens.shape[0]), max_num_batched_tokens=max(1, T))
        builder = cls.get_builder_cls()(spec, query.device, num_blocks=NB, validate=False)
        metadata = builder.build(0, common)
        return impl.forward(None, query, None, None, kv_cache, metadata, out)

    @classmethod
    def write_kv_cache(
        cls, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Cache write through the class API; backends may override."""
        impl = cls.get_impl_cls()(
            num_heads=key.shape[1], head_size=key.shape[2], scale=1.0, num_kv_heads=key.shape[1],
            head_size_v=value.shape[2],
        )
        impl.do_kv_cache_update(None, key, value, kv_cache, slot_mapping)

    # -- capability check -------------------------------------------------
    @classmethod
    def validate_configuration(
        cls,
        *,
        head_size: int,
        head_size_v: int,
        dtype: torch.dtype | None = None,
        kv_cache_dtype: str = "auto",
        block_size: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        use_alibi: bool = False,
        use_alibi_sqrt: bool = False,
        use_sinks: bool = False,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        attn_type: str = DECODER,
        chunk_lookback: int = -1,
        use_output_quant: bool = False,
        use_cascade: bool = False,
        device: str | torch.device | None = None,
    ) -> list[str]:
        """Every reason this backend cannot run the configuration; ``[]`` if it can.

        Arguments left as ``None`` are not checked (unknown yet).
        """
        caps = cls.capabilities
        n = cls.get_name()
        reasons: list[str] = []
        if dtype is not None and dtype not in caps.dtypes:
            reasons.append(
                f"dtype={dtype} is not supported by {n}; supported: "
                + ", ".join(str(d) for d in caps.dtypes)
            )
        if is_per_token_head_quant(kv_cache_dtype):
            reasons.append(
                f"kv_cache_dtype={kv_cache_dtype!r}: per-token-head quantization is not supported by {n}"
            )
        elif kv_cache_dtype not in caps.kv_cache_dtypes:
            kind = "quantized KV cache" if is_quantized_kv_cache(kv_cache_dtype) else "KV cache dtype"
            reasons.append(
                f"kv_cache_dtype={kv_cache_dtype!r}: {kind} is not supported by {n}; "
                f"supported: {list(caps.kv_cache_dtypes)}"
            )
        if block_size is not None and (
            block_size <= 0 or block_size % caps.block_size_multiple != 0 or block_size > caps.max_block_size
        ):
            reasons.append(
                f"block_size={block_size} is not supported by {n}; expected a multiple of "
                f"{caps.block_size_multiple} up to {caps.max_block_size}"
            )
        if head_size not in caps.head_sizes:
            reasons.append(
                f"head_size={head_size} (Dqk) is not supported by {n}; supported: "
                f"{_ranges(caps.head_sizes)}"
            )
        if head_size_v not in caps.head_sizes_v:
            reasons.append(
                f"head_size_v={head_size_v} (Dv) is not supported by {n}; supported: "
                f"{_ranges(caps.head_sizes_v)}"
            )
        if num_heads is not None and num_kv_heads is not None and num_heads != num_kv_heads:
            if Feature.GQA not in caps.features:
                reasons.append(
                    f"num_heads={num_heads} != num_kv_heads={num_kv_heads}: grouped-query attention is not supported by {n}"
                )
        feature_flags = (
            (use_alibi and not use_alibi_sqrt, Feature.ALIBI, "ALiBi (linear)"),
            (use_alibi_sqrt, Feature.ALIBI_SQRT, "ALiBi sqrt mode (use_alibi_sqrt=True)"),
            (use_sinks, Feature.SINKS, "attention sinks"),
            (sliding_window is not None, Feature.SLIDING_WINDOW, f"sliding_window={sliding_window}"),
            (logits_soft_cap is not None and logits_soft_cap > 0, Feature.SOFTCAP, f"logits_soft_cap={logits_soft_cap}"),
        )
        for wanted, feature, what in feature_flags:
            if wanted and feature not in caps.features:
                reasons.append(f"{what} is not supported by {n}")
        if attn_type != DECODER:
            reasons.append(
                f"attn_type={attn_type!r}: only causal decoder self-attention is supported by {n} "
                "(encoder, encoder-only and cross attention are not)"
            )
        if chunk_lookback is not None and chunk_lookback > -1:
            reasons.append(
                f"chunk_lookback={chunk_lookback}: chunked attention with lookback is not supported by {n}"
            )
        if use_output_quant:
            reasons.append(f"fused output quantization (output_scale / output_block_scale) is not supported by {n}")
        if use_cascade:
            reasons.append(f"cascade attention (use_cascade=True) is not supported by {n}")
        if device is not None:
            dev_type = torch.device(device).type
            if dev_type not in caps.devices:
                reasons.append(f"device={dev_type!r} is not supported by {n}; supported: {list(caps.devices)}")
        return reasons


def _ranges(values: tuple[int, ...]) -> str:
    v = sorted(values)
    if len(v) > 3:
        step = v[1] - v[0]
        if all(b - a == step for a, b in zip(v, v[1:])):
            return f"{v[0]}..{v[-1]} in steps of {step}"
    return str(v)


class DiffKVImpl:
    """One attention layer. Checks arguments once for every backend; subclasses
    implement :meth:`_write_kv_cache` and :meth:`_attention`.

    Constructor arguments follow vLLM's ``AttentionImpl`` plus ``head_size_v``
    (per layer).
    """

    backend: ClassVar[type[DiffKVBackend]]

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | torch.Tensor | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        use_alibi_sqrt: bool = False,
        chunk_lookback: int = -1,
        head_size_v: int | None = None,
    ) -> None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_size_v = head_size if head_size_v is None else head_size_v
        validation.check_layer_config(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            head_size_v=head_size_v,
            scale=scale,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
        )
        if alibi_slopes is not None:
            alibi_slopes = torch.as_tensor(alibi_slopes, dtype=torch.float32)
            validation.check_per_head_vector("alibi_slopes", alibi_slopes, num_heads)
        elif use_alibi_sqrt:
            raise validation.InvalidInputError(
                "use_alibi_sqrt=True needs alibi_slopes (a float32 [num_heads] tensor); got alibi_slopes=None"
            )
        if sinks is not None:
            validation.check_per_head_vector("sinks", sinks, num_heads)
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            logits_soft_cap = None  # vLLM convention: 0 / None disable softcap
        reasons = self.backend.validate_configuration(
            head_size=head_size,
            head_size_v=head_size_v,
            kv_cache_dtype=kv_cache_dtype,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            use_alibi=alibi_slopes is not None,
            use_alibi_sqrt=use_alibi_sqrt,
            use_sinks=sinks is not None,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
            attn_type=attn_type,
            chunk_lookback=chunk_lookback,
        )
        if reasons:
            raise UnsupportedConfigError(reasons, backend=self.backend.get_name())
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.head_size = head_size
        self.head_size_v = head_size_v
        self.scale = float(scale)
        self.alibi_slopes = alibi_slopes
        self.use_alibi_sqrt = use_alibi_sqrt
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = logits_soft_cap
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sinks = sinks
        self.chunk_lookback = chunk_lookback
        self._device_params: dict[torch.device, tuple[Any, Any]] = {}

    # -- per-device copies of small per-head parameters ---------------------
    def _params_on(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(alibi_slopes, sinks) as fp32 tensors on ``device``; cached so the
        hot path does no host-to-device copy after the first call."""
        if device not in self._device_params:
            slopes = None if self.alibi_slopes is None else self.alibi_slopes.to(device, torch.float32).contiguous()
            sinks = None if self.sinks is None else self.sinks.to(device, torch.float32).contiguous()
            self._device_params[device] = (slopes, sinks)
        return self._device_params[device]

    # -- public API ---------------------------------------------------------
    def do_kv_cache_update(
        self,
        layer: Any,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store ``key [T, Hkv, Dqk]`` and ``value [T, Hkv, Dv]`` at flat slots
        ``slot_mapping [T]`` (negative = skip) of ``kv_cache``."""
        validation.check_cache_write_inputs(
            key, value, kv_cache, slot_mapping, head_size=self.head_size, head_size_v=self.head_size_v,
            num_kv_heads=self.num_kv_heads,
        )
        self._write_kv_cache(key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: DiffKVMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention for the first ``attn_metadata.num_actual_tokens`` rows.

        Shapes: ``query [T, H, Dqk]``, ``kv_cache [NB, BS, Hkv, Dqk+Dv]``,
        ``output [T, H, Dv]``. ``key``/``value`` are not read (the cache was
        already updated by :meth:`do_kv_cache_update`). Rows not owned by a
        sequence are never written. ``attn_metadata is None`` (profiling run)
        zero-fills ``output``.
        """
        name = self.backend.get_name()
        if output_scale is not None or output_block_scale is not None:
            raise UnsupportedConfigError(
                [f"fused output quantization (output_scale / output_block_scale) is not supported by {name}"],
                backend=name,
            )
        if output is None:
            raise validation.InvalidInputError("output=None; expected a preallocated [T, H, Dv] tensor")
        if attn_metadata is None:
            return output.fill_(0)
        if getattr(attn_metadata, "use_cascade", False):
            raise UnsupportedConfigError(
                [f"cascade attention (attn_metadata.use_cascade=True) is not supported by {name}"], backend=name
            )
        validation.check_attention_inputs(
            query,
            kv_cache,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            attn_metadata.block_table,
            output,
            head_size_v=self.head_size_v,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
        )
        num_actual = getattr(attn_metadata, "num_actual_tokens", None)
        if num_actual is not None and num_actual > query.shape[0]:  # host int: no device sync
            raise validation.ShapeError(
                f"attn_metadata.num_actual_tokens={num_actual} (query_start_loc[-1]) exceeds the {query.shape[0]} "
                f"query rows (query shape {list(query.shape)}); expected num_actual_tokens <= query.shape[0]"
            )
        reasons = self.backend.validate_configuration(
            head_size=self.head_size,
            head_size_v=self.head_size_v,
            dtype=query.dtype,
            block_size=kv_cache.shape[1],
            device=query.device,
        )
        if reasons:
            raise UnsupportedConfigError(reasons, backend=name)
        self._attention(query, kv_cache, attn_metadata, output)
        return output

    # -- backend hooks -------------------------------------------------------
    def _write_kv_cache(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        raise NotImplementedError

    def _attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: DiffKVMetadata, output: torch.Tensor
    ) -> None:
        """Write ``output[t]`` for every owned row ``t`` (and nothing else)."""
        raise NotImplementedError
