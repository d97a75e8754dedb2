"""diffkv behind vLLM 0.33's attention-backend base classes.

Everything here subclasses vLLM's own classes of the pinned release
(``vllm.v1.attention.backend``) and delegates the work to diffkv's backend
classes, so no kernel logic or argument checking is duplicated:

* :class:`DiffKVVllmBackend` (``AttentionBackend``) -- capabilities are
  diffkv's Triton ``BackendCapabilities`` (data) expressed through vLLM's
  ``supports_*`` hooks, so vLLM's own ``validate_configuration`` gives the
  verdicts and reason strings vLLM users know.
* :class:`DiffKVVllmImpl` (``AttentionImpl``) -- one per layer; holds a diffkv
  impl (Triton on CUDA, the reference on CPU; see
  :attr:`DiffKVVllmBackend.kernel_backend`) per ``(Dv, device type)``.
* :class:`DiffKVVllmMetadataBuilder` (``AttentionMetadataBuilder``) -- wraps
  the diffkv builder of the same kernel backend (Triton: a split-KV
  workspace sized by the group's ``head_size_v``, allocated once).

Cache layout. vLLM 0.33 hands each layer a cache that is *logically*
``[num_blocks, num_kv_heads, block_size, Dqk + Dv]`` (physical order set by
the KV-cache layout, e.g. NHD or HND). ``kv_cache.transpose(1, 2)`` is the
``[num_blocks, block_size, num_kv_heads, Dqk + Dv]`` view diffkv's kernels
read and write -- a view with whatever strides vLLM chose on the first three
dims, never a copy.

Dv is per layer. vLLM's own ``TritonAttentionDiffKVBackend`` keeps Dv in a
class attribute that model code sets with ``set_head_size_v`` before building
each layer, and reads it back in ``forward`` -- so the last layer built
decides Dv for every layer. Here ``set_head_size_v`` still exists (model code
calls it), but it is only a construction-time hint: each call takes Dv from
the layer's own cache (``kv_cache.shape[-1] - head_size``, a shape, no device
read), and the builder from its group's ``AttentionSpec.head_size_v``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import vllm.envs as vllm_envs
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
)
from vllm.v1.attention.backend import CommonAttentionMetadata as VllmCommonAttentionMetadata
from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers
from vllm.v1.kv_cache_interface import AttentionSpec, get_kv_quant_mode, is_quantized_kv_cache

from diffkv import validation
from diffkv.backends import resolve_backend
from diffkv.errors import InvalidInputError, MetadataError, ShapeError, UnsupportedConfigError
from diffkv.interface import DiffKVBackend, DiffKVImpl, Feature
from diffkv.metadata import CommonAttentionMetadata, DiffKVMetadata, DiffKVMetadataBuilder, KVCacheSpec
from diffkv.triton.backend import TritonBackend
from diffkv.vllm import BACKEND_NAME

CAPABILITIES = TritonBackend.capabilities
"""What vLLM is told this backend supports: diffkv's Triton capabilities (the
kernels vLLM runs on CUDA)."""

UNQUANTIZED_CACHE_DTYPES = ("auto", "float16", "bfloat16")
"""Cache dtypes accepted by vLLM's name: "auto" (= model dtype), or an
explicit 16-bit dtype equal to the model dtype (checked in
``supports_combination``)."""

_CACHE_DTYPE_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def kernel_backend_for(device: torch.device | str) -> type[DiffKVBackend]:
    """The diffkv backend class that runs on ``device`` for this adapter
    (:attr:`DiffKVVllmBackend.kernel_backend`; "auto" = Triton on CUDA, the
    reference on CPU)."""
    return resolve_backend(DiffKVVllmBackend.kernel_backend, torch.device(device))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_diffkv_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """vLLM's logical ``[num_blocks, Hkv, block_size, Dqk + Dv]`` cache as the
    ``[num_blocks, block_size, Hkv, Dqk + Dv]`` view diffkv uses (no copy)."""
    if not isinstance(kv_cache, torch.Tensor):
        raise InvalidInputError(f"kv_cache must be a torch.Tensor; got {type(kv_cache).__name__}")
    if kv_cache.dim() != 4:
        raise ShapeError(
            f"kv_cache has shape {list(kv_cache.shape)} (rank {kv_cache.dim()}); expected vLLM's rank-4 "
            "[num_blocks, num_kv_heads, block_size, head_size + head_size_v]"
        )
    return kv_cache.transpose(1, 2)


# ----------------------------------------------------------------------------
# backend
# ----------------------------------------------------------------------------


class DiffKVVllmBackend(AttentionBackend):
    """vLLM attention backend running diffkv's kernels.

    Attributes:
        head_size_v: construction-time hint set by model code through
            :meth:`set_head_size_v` (vLLM's DiffKV convention). Never read in
            ``forward``: each layer's Dv comes from its own cache.
        kernel_backend: which diffkv backend runs the kernels: "auto"
            (Triton on CUDA, the readable reference on CPU), "triton",
            "reference" or "package.module:Class".
    """

    head_size_v: ClassVar[int | None] = None
    kernel_backend: ClassVar[str] = "auto"

    supported_dtypes: ClassVar[list[torch.dtype]] = list(CAPABILITIES.dtypes)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(UNQUANTIZED_CACHE_DTYPES)

    # vLLM calls impl.do_kv_cache_update before impl.forward
    forward_includes_kv_cache_update: bool = False

    @classmethod
    def set_head_size_v(cls, head_size_v: int) -> None:
        """Dv of the layer about to be built (vLLM model-code convention).
        A hint only: it does not change layers already built."""
        validation._require_int("head_size_v", head_size_v, minimum=1)
        cls.head_size_v = head_size_v

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[DiffKVVllmImpl]:
        return DiffKVVllmImpl

    @staticmethod
    def get_builder_cls() -> type[DiffKVVllmMetadataBuilder]:
        return DiffKVVllmMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int]:
        """Every multiple of 16 up to 256 (diffkv's Triton block sizes); vLLM
        splits larger manager blocks into kernel blocks of these sizes."""
        step, top = CAPABILITIES.block_size_multiple, CAPABILITIES.max_block_size
        return list(range(step, top + 1, step))

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(CAPABILITIES.head_sizes)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in CAPABILITIES.head_sizes

    @classmethod
    def supports_sink(cls) -> bool:
        return CAPABILITIES.supports(Feature.SINKS)

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return CAPABILITIES.supports(Feature.ALIBI_SQRT)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return CAPABILITIES.supports(Feature.SLIDING_WINDOW)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        # causal decoder self-attention only (no encoder / encoder-only / cross attention)
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        # bidirectional multimodal-prefix ranges are not implemented
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        # reference sliding-window attention (global prefix + window) is not implemented
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        # tile sizes and the KV split count depend on the batch: results are
        # not bitwise independent of batch composition
        return False

    @classmethod
    def supports_compute_capability(cls, capability: Any) -> bool:
        return True

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str | None,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability: Any,
    ) -> str | None:
        """An explicit 16-bit cache dtype must equal the model dtype (the
        kernels read the cache in the query's dtype)."""
        want = _CACHE_DTYPE_TORCH.get(kv_cache_dtype or "auto")
        if want is not None and dtype != want:
            return f"kv_cache_dtype {kv_cache_dtype} with model dtype {dtype} not supported"
        return None


# ----------------------------------------------------------------------------
# impl
# ----------------------------------------------------------------------------


class DiffKVVllmImpl(AttentionImpl[DiffKVMetadata]):
    """One vLLM attention layer, run by a diffkv impl.

    Constructed by vLLM's ``Attention`` layer with the positional arguments
    of ``AttentionImpl`` plus ``sinks`` / ``use_alibi_sqrt`` /
    ``chunk_lookback`` keywords; ``head_size_v`` is optional (default: the
    backend's :meth:`~DiffKVVllmBackend.set_head_size_v` hint, else
    ``head_size``) and only used to validate early.

    Raises:
        UnsupportedConfigError: (a ``NotImplementedError``) every unsupported
            option at once: quantized or per-token-head-quantized cache,
            chunked attention with lookback, encoder attention, head sizes
            or features the kernels do not support, and what backend
            selection would refuse (model dtype, a 16-bit cache dtype other
            than the model's, batch invariance, context parallelism,
            prefix-LM, R-SWA, non-causal attention): DiffKV model code hands
            the backend class to ``Attention`` directly, bypassing selection.
        InvalidInputError: malformed arguments (e.g. ``num_heads`` not a
            multiple of ``num_kv_heads``, sinks of the wrong length).
    """

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
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        use_alibi_sqrt: bool = False,
        chunk_lookback: int = -1,
        head_size_v: int | None = None,
    ) -> None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_size_v is None:
            head_size_v = DiffKVVllmBackend.head_size_v if DiffKVVllmBackend.head_size_v is not None else head_size
        reasons = self._vllm_option_reasons(kv_cache_dtype, chunk_lookback, attn_type)
        reasons += self._selection_reasons(kv_cache_dtype)

        self.num_heads = num_heads
        self.head_size = head_size
        self.head_size_v = head_size_v
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads if num_kv_heads else 0
        self.alibi_slopes = alibi_slopes
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = logits_soft_cap
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sinks = sinks
        self.use_alibi_sqrt = use_alibi_sqrt
        self.chunk_lookback = chunk_lookback
        # what every diffkv impl of this layer is built with (+ head_size_v);
        # the options rejected above are passed in their supported form so the
        # diffkv impl reports only the remaining reasons.
        self._layer_kwargs: dict[str, Any] = dict(
            num_heads=num_heads,
            head_size=head_size,
            scale=scale,
            num_kv_heads=num_kv_heads,
            alibi_slopes=alibi_slopes,
            sliding_window=sliding_window,
            kv_cache_dtype="auto",
            logits_soft_cap=logits_soft_cap,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
            sinks=sinks,
            use_alibi_sqrt=use_alibi_sqrt,
        )
        self._impls: dict[tuple[int, str], DiffKVImpl] = {}
        # per-device fp32 copies of alibi slopes / sinks, shared by all diffkv
        # impls of this layer (same parameters whatever the Dv)
        self._device_params: dict[torch.device, tuple[Any, Any]] = {}
        try:  # validate now (vLLM builds layers at model init), on the device vLLM will use
            self._impl_for(head_size_v, _default_device())
        except UnsupportedConfigError as e:
            reasons.extend(e.reasons)
        if reasons:
            raise UnsupportedConfigError(reasons, backend=BACKEND_NAME)

    @staticmethod
    def _vllm_option_reasons(kv_cache_dtype: str, chunk_lookback: int, attn_type: str) -> list[str]:
        """vLLM-specific options diffkv's kernels do not implement, in vLLM's wording."""
        reasons = []
        if not isinstance(kv_cache_dtype, str):
            raise InvalidInputError(f"kv_cache_dtype={kv_cache_dtype!r}; expected a string such as 'auto'")
        try:
            mode = get_kv_quant_mode(kv_cache_dtype)
        except (KeyError, ValueError):  # a name vLLM does not know either
            mode = None
        if mode is not None and mode.is_per_token_head:
            reasons.append(
                f"{BACKEND_NAME} does not support per-token-head quantization (got kv_cache_dtype={kv_cache_dtype!r})."
            )
        elif mode is not None and is_quantized_kv_cache(kv_cache_dtype):
            reasons.append(
                f"{BACKEND_NAME} does not yet support quantized KV cache (got kv_cache_dtype={kv_cache_dtype!r}); "
                "use kv_cache_dtype='auto'."
            )
        elif kv_cache_dtype not in UNQUANTIZED_CACHE_DTYPES:
            reasons.append(
                f"{BACKEND_NAME} does not support kv_cache_dtype={kv_cache_dtype!r}; "
                f"supported: {list(UNQUANTIZED_CACHE_DTYPES)}."
            )
        if chunk_lookback is not None and chunk_lookback > -1:
            reasons.append(
                f"{BACKEND_NAME} does not support chunked attention with lookback (got chunk_lookback={chunk_lookback})."
            )
        if attn_type != AttentionType.DECODER:
            reasons.append(
                f"{BACKEND_NAME} only supports decoder self-attention (got attn_type={getattr(attn_type, 'value', attn_type)!r}); "
                "encoder, encoder-only and encoder-decoder attention are not supported."
            )
        return reasons

    def _selection_reasons(self, kv_cache_dtype: str) -> list[str]:
        """What vLLM's backend selection (``validate_configuration``) would
        refuse, checked again here because DiffKV model code passes the
        backend class to ``Attention`` directly, bypassing selection. Reads
        the model dtype (vLLM builds layers under it as torch's default
        dtype), ``VLLM_BATCH_INVARIANT`` and the current vLLM config."""
        reasons = []
        dtype = torch.get_default_dtype()
        if dtype not in CAPABILITIES.dtypes:
            reasons.append(
                f"{BACKEND_NAME} does not support model dtype {dtype}; supported: "
                + ", ".join(str(d) for d in CAPABILITIES.dtypes) + "."
            )
        want = _CACHE_DTYPE_TORCH.get(kv_cache_dtype)
        if want is not None and want != dtype:
            reasons.append(
                f"{BACKEND_NAME} does not support kv_cache_dtype={kv_cache_dtype!r} with model dtype {dtype} "
                "(the kernels read the cache in the model dtype); use kv_cache_dtype='auto'."
            )
        if vllm_envs.VLLM_BATCH_INVARIANT:
            reasons.append(f"{BACKEND_NAME} does not support batch invariance (VLLM_BATCH_INVARIANT=1).")
        if getattr(self, "dcp_world_size", 1) > 1 or getattr(self, "pcp_world_size", 1) > 1:
            reasons.append(
                f"{BACKEND_NAME} does not support context parallelism (decode CP world size "
                f"{getattr(self, 'dcp_world_size', 1)}, prefill CP world size {getattr(self, 'pcp_world_size', 1)})."
            )
        config = get_current_vllm_config_or_none()
        if config is not None:
            model_config = config.model_config
            if model_config is not None and model_config.is_mm_prefix_lm:
                reasons.append(f"{BACKEND_NAME} does not support partial multimodal token full attention (prefix LM).")
            if model_config is not None and model_config.rswa_window is not None:
                reasons.append(f"{BACKEND_NAME} does not support R-SWA (rswa_window={model_config.rswa_window}).")
            if config.attention_config.use_non_causal:
                reasons.append(f"{BACKEND_NAME} does not support non-causal attention (attention_config.use_non_causal).")
        return reasons

    def _impl_for(self, head_size_v: int, device: torch.device) -> DiffKVImpl:
        """The diffkv impl of this layer for ``head_size_v`` on ``device``'s
        type (built once, then cached)."""
        key = (head_size_v, device.type)
        impl = self._impls.get(key)
        if impl is None:
            impl = kernel_backend_for(device).get_impl_cls()(**self._layer_kwargs, head_size_v=head_size_v)
            impl._device_params = self._device_params
            self._impls[key] = impl
        return impl

    def _layer_impl(self, layer: Any, cache: torch.Tensor, device: torch.device) -> DiffKVImpl:
        """The diffkv impl for this call; Dv from the layer's cache (shape only)."""
        head_size_v = cache.shape[-1] - self.head_size
        layer_dv = getattr(layer, "head_size_v", None)
        if isinstance(layer_dv, int) and layer_dv != head_size_v:
            raise ShapeError(
                f"kv_cache has last dim {cache.shape[-1]} = head_size {self.head_size} + {head_size_v}, but the layer "
                f"has head_size_v={layer_dv}; expected {self.head_size} + {layer_dv} = {self.head_size + layer_dv}"
            )
        return self._impl_for(head_size_v, device)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Weights (e.g. sinks) were (re)loaded in place: refresh the per-device
        fp32 copies of sinks / ALiBi slopes now, on the device of the weights,
        so that no forward (e.g. the first one, inside CUDA-graph capture)
        has to copy them."""
        self._device_params.clear()
        if self.sinks is None and self.alibi_slopes is None:
            return
        if isinstance(self.sinks, torch.Tensor) and self.sinks.device.type != "meta":
            device = self.sinks.device
        else:
            device = _default_device()
            if device.type == "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
        self._impl_for(self.head_size_v, device)._params_on(device)

    def do_kv_cache_update(
        self,
        layer: Any,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write ``key [T, Hkv, Dqk]`` / ``value [T, Hkv, Dv]`` into the layer's
        cache at ``slot_mapping`` (negative = skip). As in vLLM, the slot
        mapping has one entry per token to write; rows of ``key``/``value``
        past it (padding) are not read."""
        cache = _as_diffkv_cache(kv_cache)
        n = slot_mapping.shape[0] if isinstance(slot_mapping, torch.Tensor) and slot_mapping.dim() == 1 else None
        if n is not None and isinstance(key, torch.Tensor) and key.dim() >= 1 and key.shape[0] > n:
            key, value = key[:n], value[:n]
        device = key.device if isinstance(key, torch.Tensor) else cache.device
        self._layer_impl(layer, cache, device).do_kv_cache_update(layer, key, value, cache, slot_mapping)

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: DiffKVMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over the first ``attn_metadata.num_actual_tokens`` rows.

        Shapes: ``query [T, H, Dqk]``, ``kv_cache`` logical
        ``[num_blocks, Hkv, block_size, Dqk + Dv]``, ``output [T, H, Dv]``.
        Rows past ``num_actual_tokens`` (padding) and rows not owned by a
        sequence are not written. ``attn_metadata is None`` (profiling run)
        zero-fills ``output``.
        """
        if output_scale is not None or output_block_scale is not None:
            raise UnsupportedConfigError(
                [f"fused output quantization (output_scale / output_block_scale) is not supported for "
                 f"{type(self).__name__} ({BACKEND_NAME})"],
                backend=BACKEND_NAME,
            )
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        if getattr(attn_metadata, "use_cascade", False):
            raise UnsupportedConfigError(
                [f"cascade attention (attn_metadata.use_cascade=True) is not supported for {type(self).__name__} "
                 f"({BACKEND_NAME})"],
                backend=BACKEND_NAME,
            )
        n = attn_metadata.num_actual_tokens
        cache = _as_diffkv_cache(kv_cache)
        impl = self._layer_impl(layer, cache, query.device)
        impl.forward(layer, query[:n], None, None, cache, attn_metadata, output[:n])
        return output


# ----------------------------------------------------------------------------
# metadata builder
# ----------------------------------------------------------------------------


class DiffKVVllmMetadataBuilder(AttentionMetadataBuilder[DiffKVMetadata]):
    """Builds diffkv's :class:`~diffkv.metadata.DiffKVMetadata` from vLLM's
    ``CommonAttentionMetadata``, once per step and KV-cache group.

    Host-side only: dtypes and shapes of the metadata tensors and the values
    of vLLM's CPU copy ``query_start_loc_cpu`` are checked; no device value is
    read (no sync). Options the kernels do not implement and that vLLM would
    only send if the backend claimed them (per-request or non-causal masks,
    multimodal prefix ranges, R-SWA prefixes) raise
    :class:`~diffkv.errors.UnsupportedConfigError` instead of being ignored.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: Any,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        num_heads = get_num_attention_heads_from_layers(vllm_config, layer_names)
        if num_heads is None and vllm_config.model_config is not None:
            num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        if num_heads is None:
            raise InvalidInputError(
                f"{type(self).__name__}: cannot tell num_heads for layers {layer_names}: no attention layer of "
                "that name in vllm_config.compilation_config.static_forward_context and no model_config"
            )
        head_size_v = kv_cache_spec.head_size_v
        reasons = []
        if kv_cache_spec.head_size not in CAPABILITIES.head_sizes or head_size_v not in CAPABILITIES.head_sizes_v:
            reasons = TritonBackend.validate_configuration(head_size=kv_cache_spec.head_size, head_size_v=head_size_v)
        if reasons:
            raise UnsupportedConfigError(reasons, backend=BACKEND_NAME)
        sched = vllm_config.scheduler_config
        self.diffkv_spec = KVCacheSpec(
            block_size=kv_cache_spec.block_size,
            num_kv_heads=kv_cache_spec.num_kv_heads,
            num_heads=num_heads,
            head_size=kv_cache_spec.head_size,
            head_size_v=head_size_v,
            dtype=kv_cache_spec.dtype,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
        )
        builder_cls: type[DiffKVMetadataBuilder] = kernel_backend_for(device).get_builder_cls()
        # values are checked here (host copies), not by the diffkv builder, whose
        # checks read device tensors and expect num_actual_tokens == query_start_loc[-1]
        # (vLLM pads num_actual_tokens)
        self.inner = builder_cls(self.diffkv_spec, device, validate=False)

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        """ALWAYS when the kernels that run on CUDA declare a capturable
        forward (diffkv's Triton: host-side checks only, preallocated
        workspace, correct for any metadata values of the captured shapes);
        NEVER otherwise (e.g. ``kernel_backend = "reference"``)."""
        kernels = kernel_backend_for("cuda")
        return AttentionCGSupport.ALWAYS if kernels.supports_feature(Feature.CUDA_GRAPH) else AttentionCGSupport.NEVER

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: VllmCommonAttentionMetadata,
        fast_build: bool = False,
    ) -> DiffKVMetadata:
        """``common_prefix_len`` is ignored (deprecated and always 0 in vLLM
        0.33; diffkv never uses cascade attention, so the result is the same)."""
        c = common_attn_metadata
        self._check_unsupported(c)
        self._check_host(c)
        common = CommonAttentionMetadata(
            query_start_loc=c.query_start_loc,
            seq_lens=c.seq_lens,
            block_table_tensor=c.block_table_tensor,
            slot_mapping=c.slot_mapping,
            num_reqs=c.num_reqs,
            num_actual_tokens=c.num_actual_tokens,
            max_query_len=c.max_query_len,
            max_seq_len=c.max_seq_len,
            query_start_loc_cpu=c.query_start_loc_cpu,
            seq_lens_cpu=None,  # vLLM 0.33 keeps only an upper bound on the host
        )
        return self.inner.build(0, common, fast_build)

    @staticmethod
    def _check_unsupported(c: VllmCommonAttentionMetadata) -> None:
        reasons = []
        causal = getattr(c, "causal", True)
        if isinstance(causal, torch.Tensor):
            reasons.append("per-request causal flags (CommonAttentionMetadata.causal as a tensor) are not supported")
        elif causal is not True:
            reasons.append(f"non-causal attention (CommonAttentionMetadata.causal={causal!r}) is not supported")
        if getattr(c, "mm_req_doc_ranges", None) is not None:
            reasons.append("partial multimodal token full attention (mm_req_doc_ranges) is not supported")
        if getattr(c, "rswa_prefix_lens", None) is not None:
            reasons.append("R-SWA (rswa_prefix_lens) is not supported")
        if reasons:
            raise UnsupportedConfigError(reasons, backend=BACKEND_NAME)

    @staticmethod
    def _check_host(c: VllmCommonAttentionMetadata) -> None:
        """Dtypes, ranks and sizes of the metadata tensors, and the values of
        the host copy of ``query_start_loc``. Reads no device memory."""
        S = c.num_reqs
        for name, t, rank in (
            ("query_start_loc", c.query_start_loc, 1),
            ("seq_lens", c.seq_lens, 1),
            ("block_table_tensor", c.block_table_tensor, 2),
        ):
            if not isinstance(t, torch.Tensor):
                raise MetadataError(f"common_attn_metadata.{name} must be a torch.Tensor; got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise MetadataError(f"common_attn_metadata.{name} has dtype {t.dtype}; expected torch.int32")
            if t.dim() != rank:
                raise MetadataError(
                    f"common_attn_metadata.{name} has shape {list(t.shape)}; expected rank {rank}"
                )
        if c.query_start_loc.shape[0] < S + 1 or c.seq_lens.shape[0] < S or c.block_table_tensor.shape[0] < S:
            raise MetadataError(
                f"num_reqs={S} but query_start_loc has shape {list(c.query_start_loc.shape)}, seq_lens "
                f"{list(c.seq_lens.shape)}, block_table_tensor {list(c.block_table_tensor.shape)}; expected at least "
                f"[{S + 1}], [{S}] and [{S}, max_blocks]"
            )
        qsl = c.query_start_loc_cpu
        if qsl is None or qsl.device.type != "cpu" or qsl.shape[0] < S + 1:
            raise MetadataError(
                f"common_attn_metadata.query_start_loc_cpu must be a host tensor of at least {S + 1} values "
                f"(num_reqs + 1); got {None if qsl is None else (list(qsl.shape), str(qsl.device))}"
            )
        validation.check_query_start_loc_values(
            qsl[: S + 1], num_tokens=c.num_actual_tokens, name="query_start_loc_cpu", item="request",
            bound=f"num_actual_tokens={c.num_actual_tokens}; expected the requests' query tokens to fit in the batch",
        )
