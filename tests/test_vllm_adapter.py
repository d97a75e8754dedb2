"""The vLLM adapter (``diffkv.vllm``) against the real vllm==0.33.0 package, on CPU.

Skipped cleanly when vllm is not installed (the main suite never needs it);
CI installs it the lean way (``scripts/install_vllm_lean.sh``) and runs
``pytest -m vllm tests/test_vllm_adapter.py`` with ``DIFFKV_REQUIRE_VLLM=1``,
which turns the skip into a failure.

Covered: registration and lookup through vLLM's registry and its plugin
entry point; ``validate_configuration`` over a grid compared with vLLM's own
``TritonAttentionDiffKVBackend`` (same verdicts and reason strings, or a
documented deliberate difference that the grid exercises); the impl's typed
errors; the metadata builder fed vLLM's real ``CommonAttentionMetadata``;
cache update + forward on caches laid out by vLLM's own allocator code
(several physical layouts, transposed views), compared with diffkv's
float64 reference, through the impl and through vLLM's ``Attention`` layer
(its custom ops and forward context); two layers with different Dv in one
process; the profiling run; CUDA-graph support declaration.

Kernels on CPU: the reference, and diffkv's Triton kernels in the Triton
interpreter (fp16: bf16 ``tl.dot`` is wrong in the interpreter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import itertools
import os
import random
import subprocess
import sys

import pytest
import torch

REQUIRE_VLLM = os.environ.get("DIFFKV_REQUIRE_VLLM") == "1"
if not torch.cuda.is_available():
    # vLLM builds its config objects on a CPU-only machine only with this set
    # (must be set before vllm is imported; affects vllm only)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

if REQUIRE_VLLM:
    import vllm  # noqa: F401  (CI: a broken install must fail, not skip)
vllm = pytest.importorskip("vllm", reason="the vLLM adapter tests need vllm==0.33.0 (scripts/install_vllm_lean.sh)")

import diffkv.vllm as dv  # noqa: E402

if vllm.__version__ != dv.VLLM_VERSION:
    if REQUIRE_VLLM:
        raise RuntimeError(f"vllm=={vllm.__version__} installed; the adapter tests need vllm=={dv.VLLM_VERSION}")
    pytest.skip(f"vllm=={vllm.__version__} installed; the adapter is pinned to {dv.VLLM_VERSION}",
                allow_module_level=True)

from vllm.config import AttentionConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.config.cache import KV_CACHE_DTYPES  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.attention.attention import Attention  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.backends.triton_attn_diffkv import (  # noqa: E402
    TritonAttentionDiffKVBackend,
    TritonAttentionDiffKVImpl,
)
from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views, is_quantized_kv_cache  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

import diffkv  # noqa: E402
from diffkv.errors import InvalidInputError, MetadataError, ShapeError, UnsupportedConfigError  # noqa: E402
from diffkv.metadata import DiffKVMetadata  # noqa: E402
from diffkv.reference.backend import ReferenceImpl  # noqa: E402
from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, make_batch  # noqa: E402
from diffkv.triton.backend import TritonBackend, TritonImpl  # noqa: E402
from diffkv.triton.kernels import attention as triton_attention  # noqa: E402
from diffkv.vllm.backend import (  # noqa: E402
    CAPABILITIES,
    DiffKVVllmBackend,
    DiffKVVllmImpl,
    DiffKVVllmMetadataBuilder,
)
from tests.triton_common import check_output, reference_f64  # noqa: E402

pytestmark = [
    pytest.mark.vllm,
    # the Triton interpreter's own numpy noise (masked rows divide 0 by 0; never stored)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

NAME = dv.BACKEND_NAME
DTYPE = torch.float16  # vLLM's "auto" cache dtype without a model config; fine in the interpreter
CPU = torch.device("cpu")

KERNELS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_attention.INTERPRETED, reason="Triton kernels on CPU need the Triton interpreter"))]


@pytest.fixture(scope="module", autouse=True)
def registered():
    dv.register()


@pytest.fixture
def kernels(request, monkeypatch):
    """Which diffkv kernels the adapter routes to on CPU."""
    monkeypatch.setattr(DiffKVVllmBackend, "kernel_backend", request.param)
    return request.param


@pytest.fixture(autouse=True)
def restore_head_size_v_hint():
    before = DiffKVVllmBackend.head_size_v
    yield
    DiffKVVllmBackend.head_size_v = before


# ----------------------------------------------------------------------------
# helpers: vLLM layers, caches and metadata
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def make_layer(cfg: VllmConfig, name: str, batch_spec: BatchSpec, features: LayerFeatures, batch) -> Attention:
    """A real vLLM ``Attention`` layer on this backend, built the way vLLM's
    DiffKV model code does it (``set_head_size_v`` then ``Attention(...)``)."""
    backend = AttentionBackendEnum[NAME].get_class()
    backend.set_head_size_v(batch_spec.head_size_v)
    extra = {}
    if batch.sinks is not None:
        extra["sinks"] = batch.sinks
    with set_current_vllm_config(cfg), default_dtype(DTYPE):
        return Attention(
            batch_spec.num_heads,
            batch_spec.head_size,
            batch.scale,
            num_kv_heads=batch_spec.num_kv_heads,
            alibi_slopes=None if batch.alibi_slopes is None else batch.alibi_slopes.tolist(),
            use_alibi_sqrt=features.alibi == "sqrt",
            cache_config=cfg.cache_config,
            logits_soft_cap=features.softcap,
            per_layer_sliding_window=features.sliding_window,
            prefix=name,
            attn_backend=backend,
            head_size_v=batch_spec.head_size_v,
            **extra,
        )


def vllm_caches(cfg: VllmConfig, layers: list[Attention], num_blocks: int, layout: KVCacheLayout
                ) -> list[torch.Tensor]:
    """Per-layer caches exactly as vLLM 0.33 lays them out (``create_kv_cache_views``
    over one int8 allocation): logical ``[num_blocks, Hkv, block_size, Dqk+Dv]``,
    physical order from ``layout``. Layers must share one spec."""
    specs = [layer.get_kv_cache_spec(cfg) for layer in layers]
    assert all(s == specs[0] for s in specs)
    spec = specs[0]
    page, L = spec.page_size_bytes, len(layers)
    if layout.is_layer_compact:
        layer_stride, block_stride = page * num_blocks, page
    else:
        layer_stride, block_stride = page, page * L
    tensor = KVCacheTensor(size=page * num_blocks * L, layers=[layer.layer_name for layer in layers],
                           layer_stride=layer_stride, block_stride=block_stride)
    raw = torch.zeros(tensor.size, dtype=torch.int8)
    views = create_kv_cache_views(raw, spec, num_blocks, layout, tensor)
    for layer, view in zip(layers, views):
        layer.kv_cache = view
    return views


def vllm_common(batch, num_actual_tokens: int | None = None, **overrides) -> CommonAttentionMetadata:
    """vLLM's real CommonAttentionMetadata for a diffkv test batch; the slot
    mapping covers ``num_actual_tokens`` tokens (-1 past the owned rows)."""
    T = batch.spec.num_tokens
    n = T if num_actual_tokens is None else num_actual_tokens
    slot = torch.full((n,), -1, dtype=torch.int64)
    m = min(n, batch.slot_mapping.shape[0])
    slot[:m] = batch.slot_mapping[:m]
    q_lens = [s.q_len for s in batch.spec.seqs]
    kw = dict(
        query_start_loc=batch.query_start_loc,
        query_start_loc_cpu=batch.query_start_loc.clone(),
        seq_lens=batch.seq_lens,
        num_reqs=len(batch.spec.seqs),
        num_actual_tokens=n,
        max_query_len=max(q_lens, default=0),
        max_seq_len=max((s.seq_len for s in batch.spec.seqs), default=0),
        block_table_tensor=batch.block_table,
        slot_mapping=slot,
    )
    kw.update(overrides)
    return CommonAttentionMetadata(**kw)


def load_cache(view: torch.Tensor, batch, hide_new_tokens: bool = True) -> torch.Tensor:
    """Copy the batch's packed cache into vLLM's view (through the transpose);
    the new tokens' slots are NaN so that only the adapter's cache update can
    make them right. Returns the expected cache content after the update."""
    cache = view.transpose(1, 2)
    cache.copy_(batch.kv_cache)
    if hide_new_tokens:
        slots = batch.slot_mapping[batch.slot_mapping >= 0]
        BS = cache.shape[1]
        cache[slots // BS, slots % BS] = float("nan")
    return batch.kv_cache


MIXED = (SeqShape(q_len=5, context_len=12), SeqShape(q_len=0, context_len=7), SeqShape(q_len=1, context_len=40),
         SeqShape(q_len=3, context_len=17), SeqShape(q_len=9, context_len=0))
SMALL = (SeqShape(q_len=3, context_len=9), SeqShape(q_len=1, context_len=20))
FEATURES = LayerFeatures(sliding_window=13, softcap=20.0, alibi="sqrt", sinks=True)  # MiMo-V2-style SWA + sinks


def spec_for(Dqk: int, Dv: int, seqs=MIXED, **kw) -> BatchSpec:
    base = dict(seqs=seqs, num_heads=4, num_kv_heads=2, head_size=Dqk, head_size_v=Dv, block_size=16, dtype=DTYPE,
                padding_rows=3, seed=5)
    base.update(kw)
    return BatchSpec(**base)


# ----------------------------------------------------------------------------
# registration, plugin entry point, import isolation
# ----------------------------------------------------------------------------


def test_backend_classes_subclass_vllm_bases():
    assert issubclass(DiffKVVllmBackend, AttentionBackend)
    assert issubclass(DiffKVVllmImpl, AttentionImpl)
    assert issubclass(DiffKVVllmMetadataBuilder, AttentionMetadataBuilder)
    assert DiffKVVllmBackend.get_impl_cls() is DiffKVVllmImpl
    assert DiffKVVllmBackend.get_builder_cls() is DiffKVVllmMetadataBuilder
    # validate_configuration is vLLM's own (conventions, reason strings), fed by our supports_* hooks
    assert DiffKVVllmBackend.validate_configuration.__func__ is AttentionBackend.validate_configuration.__func__


def test_register_and_lookup_through_vllm_registry():
    dv.register()
    dv.register()  # idempotent (vLLM may load plugins more than once)
    member = AttentionBackendEnum[NAME]
    assert member.name == NAME and NAME.endswith("_DIFFKV")  # what vLLM's DiffKV model code selects on
    assert member.get_path() == dv.BACKEND_CLASS_PATH
    assert member.get_class() is DiffKVVllmBackend
    assert DiffKVVllmBackend.get_name() == NAME
    # what `--attention-backend DIFFKV_TRITON_DIFFKV` turns into
    assert AttentionConfig(backend=NAME).backend is member
    # vLLM's Attention layer maps the class back to its registry entry by name
    assert AttentionBackendEnum[DiffKVVllmBackend.get_name()] is member


def test_plugin_entry_point_is_what_vllm_loads():
    """The installed distribution declares the entry point in the group vLLM
    0.33 loads, and vLLM's own loader finds and runs it."""
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    assert DEFAULT_PLUGINS_GROUP == dv.PLUGIN_GROUP == "vllm.general_plugins"
    eps = [ep for ep in importlib.metadata.entry_points(group=DEFAULT_PLUGINS_GROUP) if ep.name == "diffkv"]
    assert [ep.value for ep in eps] == ["diffkv.vllm:register"], "reinstall diffkv (pip install -e .) to refresh entry points"
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert plugins["diffkv"] is dv.register


def test_fresh_vllm_process_selects_backend_by_name():
    """A new process that never imports diffkv: vLLM's CLI parser loads the
    plugins (as `vllm serve` does), `--attention-backend DIFFKV_TRITON_DIFFKV`
    parses, and the engine arguments resolve it to this backend's class."""
    code = (
        "from vllm.config import AttentionConfig\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "parser = EngineArgs.add_cli_args(FlexibleArgumentParser())\n"
        f"args = EngineArgs.from_cli_args(parser.parse_args(['--attention-backend', '{NAME}']))\n"
        "member = AttentionConfig.validate_backend_before(args.attention_backend)\n"
        "cls = member.get_class()\n"
        "print(member.name, cls.__module__ + '.' + cls.__qualname__, cls.get_name())\n"
    )
    env = dict(os.environ, VLLM_TARGET_DEVICE=os.environ.get("VLLM_TARGET_DEVICE", "cpu"))
    env.pop("VLLM_PLUGINS", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{NAME} {dv.BACKEND_CLASS_PATH} {NAME}" in res.stdout


def test_importing_diffkv_does_not_import_vllm():
    code = "import sys, diffkv, diffkv.vllm; print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"


# ----------------------------------------------------------------------------
# validate_configuration: a grid against vLLM's own TritonAttentionDiffKVBackend
# ----------------------------------------------------------------------------

GRID_AXES = dict(
    head_size=[16, 32, 40, 64, 80, 96, 112, 128, 192, 200, 256, 288, 512],
    dtype=[torch.float16, torch.bfloat16, torch.float32],
    kv_cache_dtype=[None, "auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "int8_per_token_head",
                    "fp8_per_token_head", "nvfp4", "turboquant_k8v4"],
    block_size=[None, 8, 16, 24, 32, 48, 256, 512],
    use_mla=[False, True],
    has_sink=[False, True],
    use_sparse=[False, True],
    use_mm_prefix=[False, True],
    use_per_head_quant_scales=[False, True],
    attn_type=[AttentionType.DECODER, AttentionType.ENCODER, AttentionType.ENCODER_ONLY,
               AttentionType.ENCODER_DECODER],
    has_sliding_window=[False, True],
    use_non_causal=[False, True],
    use_batch_invariant=[False, True],
    use_kv_connector=[False, True],
    use_pcp=[False, True],
    use_adaptive_verification=[False, True],
    use_dcp=[False, True],
    use_rswa=[False, True],
)
GRID_BASE = {axis: values[0] for axis, values in GRID_AXES.items()}
GRID_BASE.update(head_size=192, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16)

# Each deliberate difference from vLLM's TritonAttentionDiffKVBackend: (why, predicate on the config).
DELIBERATE_DIFFERENCES = {
    "head_size": (
        "Dqk must be one of diffkv's Triton head sizes (multiples of 16 from 32 to 256); vLLM's accepts any >= 32",
        lambda c: c["head_size"] >= 32 and c["head_size"] not in CAPABILITIES.head_sizes,
    ),
    "fp8_cache": (
        "quantized (fp8 / fp8_e4m3) caches are rejected until diffkv's kernels support them; vLLM's accepts them",
        lambda c: c["kv_cache_dtype"] in ("fp8", "fp8_e4m3"),
    ),
    "float16_cache": (
        "an explicit 'float16' cache is accepted with a float16 model (vLLM's list omits it)",
        lambda c: c["kv_cache_dtype"] == "float16",
    ),
    "bfloat16_cache": (
        "an explicit 'bfloat16' cache needs a bfloat16 model (diffkv's kernels read the cache in the model dtype)",
        lambda c: c["kv_cache_dtype"] == "bfloat16" and c["dtype"] != torch.bfloat16,
    ),
    "mm_prefix": (
        "multimodal-prefix bidirectional ranges: vLLM's DiffKV inherits support from TritonAttentionBackend but its "
        "forward drops mm_prefix_range (silently causal); diffkv declines",
        lambda c: c["use_mm_prefix"],
    ),
    "rswa": (
        "R-SWA: inherited by vLLM's DiffKV but its forward drops rswa_prefix_lens; diffkv declines",
        lambda c: c["use_rswa"],
    ),
    "non_causal": (
        "non-causal attention: inherited by vLLM's DiffKV but its forward always passes causal=True; diffkv declines",
        lambda c: c["use_non_causal"],
    ),
    "batch_invariance": (
        "batch invariance: diffkv's tile sizes and KV split count depend on the batch, so it is not claimed",
        lambda c: c["use_batch_invariant"],
    ),
}


def grid_configs() -> list[dict]:
    """One factor at a time from a MiMo-V2-like base, plus a seeded random sample of combinations."""
    configs = [dict(GRID_BASE)]
    for axis, values in GRID_AXES.items():
        for v in values:
            configs.append({**GRID_BASE, axis: v})
    # pairs of the factors that interact with each other (dtypes, cache dtypes, head sizes)
    for h, d, k in itertools.product(GRID_AXES["head_size"], GRID_AXES["dtype"], GRID_AXES["kv_cache_dtype"]):
        configs.append({**GRID_BASE, "head_size": h, "dtype": d, "kv_cache_dtype": k})
    rng = random.Random(1234)
    for _ in range(1500):  # flags on with probability 1/4, so that most samples combine a few of them
        configs.append({axis: (rng.random() < 0.25) if values == [False, True] else rng.choice(values)
                        for axis, values in GRID_AXES.items()})
    return configs


def verdicts(cfg: dict) -> tuple[list[str], list[str]]:
    kw = dict(cfg, device_capability=DeviceCapability(9, 0))
    return DiffKVVllmBackend.validate_configuration(**kw), TritonAttentionDiffKVBackend.validate_configuration(**kw)


def test_validate_configuration_grid_matches_vllm_triton_diffkv_up_to_documented_differences():
    configs = grid_configs()
    explained = {key: 0 for key in DELIBERATE_DIFFERENCES}
    same = differ = 0
    for cfg in configs:
        ours, theirs = verdicts(cfg)
        why = [key for key, (_, pred) in DELIBERATE_DIFFERENCES.items() if pred(cfg)]
        if not why:
            # no deliberate factor: same verdict and the very same reason strings
            assert ours == theirs, f"{cfg}: ours {ours} vs vLLM's {theirs}"
            same += 1
            continue
        if bool(ours) != bool(theirs):
            differ += 1
            if len(why) == 1:
                explained[why[0]] += 1
    # every documented difference is real: the grid hits it alone and the verdicts differ
    assert all(explained.values()), f"documented differences never observed alone: {explained}"
    assert same > 300 and differ > 100, (same, differ)


@pytest.mark.parametrize("key", sorted(DELIBERATE_DIFFERENCES))
def test_each_deliberate_difference_direction(key):
    """The direction of each difference, at the base configuration."""
    examples = {
        "head_size": ({"head_size": 40}, False, True),
        "fp8_cache": ({"kv_cache_dtype": "fp8"}, False, True),
        "float16_cache": ({"kv_cache_dtype": "float16", "dtype": torch.float16}, True, False),
        "bfloat16_cache": ({"kv_cache_dtype": "bfloat16", "dtype": torch.float16}, False, True),
        "mm_prefix": ({"use_mm_prefix": True}, False, True),
        "rswa": ({"use_rswa": True}, False, True),
        "non_causal": ({"use_non_causal": True}, False, True),
        "batch_invariance": ({"use_batch_invariant": True}, False, True),
    }
    change, ours_ok, theirs_ok = examples[key]
    cfg = {**GRID_BASE, **change}
    ours, theirs = verdicts(cfg)
    assert (not ours, not theirs) == (ours_ok, theirs_ok), (ours, theirs)
    assert DELIBERATE_DIFFERENCES[key][1](cfg)


def test_validate_configuration_reasons_use_vllm_wording():
    ours, _ = verdicts({**GRID_BASE, "kv_cache_dtype": "fp8", "head_size": 40, "use_batch_invariant": True,
                        "attn_type": AttentionType.ENCODER})
    assert ours == ["head_size not supported", "kv_cache_dtype not supported",
                    f"attention type {AttentionType.ENCODER} not supported", "batch invariance not supported"]
    ours, _ = verdicts({**GRID_BASE, "kv_cache_dtype": "bfloat16", "dtype": torch.float16})
    assert ours == ["kv_cache_dtype bfloat16 with model dtype torch.float16 not supported"]


def test_everything_vllm_triton_diffkv_supports_is_supported_except_documented():
    """'At least what vLLM's own backend supports': every configuration vLLM's
    accepts and we reject is covered by a documented difference."""
    for cfg in grid_configs():
        ours, theirs = verdicts(cfg)
        if ours and not theirs:
            assert any(pred(cfg) for _, pred in DELIBERATE_DIFFERENCES.values()), (cfg, ours)


def test_capabilities_come_from_diffkv_triton_data():
    assert DiffKVVllmBackend.supported_dtypes == list(TritonBackend.capabilities.dtypes)
    assert DiffKVVllmBackend.get_supported_head_sizes() == list(TritonBackend.capabilities.head_sizes)
    assert DiffKVVllmBackend.get_supported_kernel_block_sizes() == list(range(16, 257, 16))
    assert DiffKVVllmBackend.supports_sink() and DiffKVVllmBackend.supports_alibi_sqrt()
    assert DiffKVVllmBackend.supports_sliding_window()
    assert not DiffKVVllmBackend.is_mla() and not DiffKVVllmBackend.is_sparse()
    assert DiffKVVllmBackend.forward_includes_kv_cache_update is False  # vLLM calls do_kv_cache_update itself
    assert DiffKVVllmBackend.supported_kv_cache_layouts() is None  # any physical layout: kernels take any strides
    # a manager block larger than the kernels' largest block is split by vLLM into kernel blocks
    from vllm.v1.worker.utils import select_common_block_size

    assert select_common_block_size(512, [DiffKVVllmBackend]) == 256
    assert select_common_block_size(48, [DiffKVVllmBackend]) == 48


# ----------------------------------------------------------------------------
# impl construction: typed errors with vLLM-style messages
# ----------------------------------------------------------------------------


def impl_args(**kw):
    args = dict(num_heads=8, head_size=192, scale=0.1, num_kv_heads=2, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto", head_size_v=128)
    args.update(kw)
    return args


@pytest.mark.parametrize("kv_cache_dtype", [d for d in KV_CACHE_DTYPES if is_quantized_kv_cache(d)])
def test_quantized_caches_rejected(kv_cache_dtype):
    with pytest.raises(UnsupportedConfigError) as err:
        DiffKVVllmImpl(**impl_args(kv_cache_dtype=kv_cache_dtype))
    assert isinstance(err.value, NotImplementedError)  # what vLLM's backends raise
    (reason,) = err.value.reasons
    assert err.value.backend == NAME and reason.startswith(NAME)
    if "per_token_head" in kv_cache_dtype:
        assert "does not support per-token-head quantization" in reason
    else:
        assert "does not yet support quantized KV cache" in reason
    assert repr(kv_cache_dtype) in reason


def test_vllm_triton_diffkv_impl_rejects_a_subset_of_what_we_reject():
    """Constructor verdicts next to vLLM's own impl (on CPU, bfloat16 model):
    every cache dtype vLLM's impl refuses, we refuse too; the only ones it
    accepts and we refuse are fp8 / fp8_e4m3 and a 16-bit cache other than
    the model dtype (both documented)."""
    extra_accepted_by_vllm = set()
    for kv in KV_CACHE_DTYPES:
        ours, theirs = impl_verdicts(kv)
        assert not (ours and not theirs), kv
        if theirs and not ours:
            extra_accepted_by_vllm.add(kv)
    assert extra_accepted_by_vllm == {"fp8", "fp8_e4m3", "float16"}


@default_dtype(torch.bfloat16)
def impl_verdicts(kv_cache_dtype: str) -> tuple[bool, bool]:
    """(ours accepts, vLLM's TritonAttentionDiffKVImpl accepts) for a cache dtype."""
    try:
        DiffKVVllmImpl(**impl_args(kv_cache_dtype=kv_cache_dtype))
        ours = True
    except UnsupportedConfigError:
        ours = False
    args = impl_args(kv_cache_dtype=kv_cache_dtype)
    args.pop("head_size_v")
    try:
        TritonAttentionDiffKVImpl(**args)
        theirs = True
    except NotImplementedError:
        theirs = False
    return ours, theirs


def test_every_reason_at_once():
    with pytest.raises(UnsupportedConfigError) as err:
        DiffKVVllmImpl(**impl_args(kv_cache_dtype="fp8", chunk_lookback=4, attn_type=AttentionType.ENCODER_ONLY,
                                   head_size=40, head_size_v=72))
    text = "\n".join(err.value.reasons)
    assert len(err.value.reasons) == 5, err.value.reasons
    for needle in ("quantized KV cache", "chunked attention with lookback (got chunk_lookback=4)",
                   "only supports decoder self-attention (got attn_type='encoder_only')", "head_size=40",
                   "head_size_v=72"):
        assert needle in text


@pytest.mark.parametrize("attn_type", [AttentionType.ENCODER, AttentionType.ENCODER_ONLY,
                                       AttentionType.ENCODER_DECODER])
def test_encoder_attention_rejected(attn_type):
    with pytest.raises(UnsupportedConfigError, match="only supports decoder self-attention"):
        DiffKVVllmImpl(**impl_args(attn_type=attn_type))


def test_malformed_layer_arguments_are_value_errors():
    with pytest.raises(ShapeError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        DiffKVVllmImpl(**impl_args(num_heads=6, num_kv_heads=4))
    with pytest.raises(ShapeError, match=r"sinks has shape \[3\]; expected \[8\]"):
        DiffKVVllmImpl(**impl_args(sinks=torch.zeros(3)))
    with pytest.raises(InvalidInputError, match="head_size_v=0"):
        DiffKVVllmBackend.set_head_size_v(0)


def test_vllm_positional_construction_and_accepted_options():
    """vLLM's Attention layer passes ten positional arguments plus keywords."""
    sinks = torch.randn(8)
    with default_dtype(torch.bfloat16):  # vLLM builds layers under the model dtype
        impl = DiffKVVllmImpl(8, 192, 0.07, 2, [0.5] * 8, 128, "bfloat16", 30.0, AttentionType.DECODER, None,
                              sinks=sinks, use_alibi_sqrt=True, chunk_lookback=-1)
    assert (impl.num_heads, impl.head_size, impl.num_kv_heads, impl.kv_cache_dtype) == (8, 192, 2, "bfloat16")
    assert impl.head_size_v == 192  # no hint: head_size (the real Dv comes from each call's cache)
    DiffKVVllmBackend.set_head_size_v(128)
    assert DiffKVVllmImpl(8, 192, 0.07, 2, None, None, "auto").head_size_v == 128


def test_impl_repeats_what_backend_selection_would_refuse(monkeypatch):
    """DiffKV model code passes the backend class to Attention directly
    (vLLM's selection and its validate_configuration never run), so the impl
    refuses what selection would: model dtype, a 16-bit cache dtype that is
    not the model's, batch invariance, non-causal / prefix-LM config."""
    with default_dtype(torch.float16), pytest.raises(UnsupportedConfigError, match="with model dtype torch.float16"):
        DiffKVVllmImpl(**impl_args(kv_cache_dtype="bfloat16"))
    with default_dtype(torch.float16):
        DiffKVVllmImpl(**impl_args(kv_cache_dtype="float16"))
    with default_dtype(torch.float64), pytest.raises(UnsupportedConfigError, match="model dtype torch.float64"):
        DiffKVVllmImpl(**impl_args())
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    with pytest.raises(UnsupportedConfigError, match="batch invariance"):
        DiffKVVllmImpl(**impl_args())
    monkeypatch.delenv("VLLM_BATCH_INVARIANT")
    cfg = VllmConfig(attention_config=AttentionConfig(use_non_causal=True))
    with set_current_vllm_config(cfg), pytest.raises(UnsupportedConfigError, match="non-causal attention"):
        DiffKVVllmImpl(**impl_args())
    with set_current_vllm_config(VllmConfig()):
        DiffKVVllmImpl(**impl_args())


def test_forward_rejects_fused_output_quant_and_cascade():
    impl = DiffKVVllmImpl(**impl_args(head_size=64, head_size_v=32))
    q, out = torch.zeros(2, 8, 64, dtype=DTYPE), torch.zeros(2, 8, 32, dtype=DTYPE)
    cache = torch.zeros(2, 2, 16, 96, dtype=DTYPE)
    with pytest.raises(UnsupportedConfigError, match="fused output quantization"):
        impl.forward(None, q, None, None, cache, None, out, output_scale=torch.ones(1))
    with pytest.raises(UnsupportedConfigError, match="fused output quantization"):
        impl.forward(None, q, None, None, cache, None, out, output_block_scale=torch.ones(1))
    md = DiffKVMetadata(num_actual_tokens=2, max_query_len=2, query_start_loc=torch.tensor([0, 2], dtype=torch.int32),
                        max_seq_len=2, seq_lens=torch.tensor([2], dtype=torch.int32),
                        block_table=torch.zeros(1, 1, dtype=torch.int32), slot_mapping=torch.zeros(2, dtype=torch.int64),
                        num_reqs=1, use_cascade=True)
    with pytest.raises(UnsupportedConfigError, match="cascade attention"):
        impl.forward(None, q, None, None, cache, md, out)
    with pytest.raises(ShapeError, match="rank-4"):
        impl.forward(None, q, None, None, cache[0], dataclasses.replace(md, use_cascade=False), out)


def test_profiling_run_zero_fills():
    impl = DiffKVVllmImpl(**impl_args(head_size=64, head_size_v=32))
    out = torch.full((5, 8, 32), float("nan"), dtype=DTYPE)
    res = impl.forward(None, torch.zeros(5, 8, 64, dtype=DTYPE), None, None, torch.tensor([]), None, out)
    assert res is out and bool((out == 0).all())


# ----------------------------------------------------------------------------
# metadata builder fed vLLM's CommonAttentionMetadata
# ----------------------------------------------------------------------------


def build_layers(cfg, specs_and_features, seed=0):
    """[(name, BatchSpec, LayerFeatures)] -> (layers, batches)."""
    layers, batches = [], []
    for name, spec, feats in specs_and_features:
        batch = make_batch(spec, feats)
        layers.append(make_layer(cfg, name, spec, feats, batch))
        batches.append(batch)
    return layers, batches


@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_metadata_builder_from_real_common_attention_metadata(kernels):
    cfg = VllmConfig()
    spec = spec_for(192, 128, seqs=SMALL, num_heads=8, num_kv_heads=2)
    (layer,), (batch,) = build_layers(cfg, [("model.layers.0.self_attn.attn", spec, FEATURES)])
    kv_spec = layer.get_kv_cache_spec(cfg)
    with set_current_vllm_config(cfg):
        builder = DiffKVVllmMetadataBuilder(kv_spec, [layer.layer_name], cfg, CPU)
    common = vllm_common(batch, num_actual_tokens=batch.spec.num_tokens + 2)  # vLLM pads num_actual_tokens
    md = builder.build(0, common)
    assert isinstance(md, DiffKVMetadata)
    assert md.query_start_loc is common.query_start_loc and md.seq_lens is common.seq_lens
    assert md.block_table is common.block_table_tensor and md.slot_mapping is common.slot_mapping
    assert (md.num_actual_tokens, md.num_reqs, md.max_query_len, md.max_seq_len) == (
        common.num_actual_tokens, 2, 3, 21)
    assert md.use_cascade is False and md.common_prefix_len == 0
    assert builder.diffkv_spec.num_heads == 8 and builder.diffkv_spec.head_size_v == 128
    if kernels == "triton":
        # split-KV workspace preallocated once, sized by Dv (not Dqk), reused by every build
        ws = md.workspace
        assert isinstance(ws, triton_attention.Workspace)
        assert ws.partial_out.numel() % (8 * 128) == 0 and ws.partial_out.numel() % (8 * 192) != 0
        assert builder.build(0, common).workspace is ws
        assert DiffKVVllmMetadataBuilder.get_cudagraph_support(cfg, kv_spec) == AttentionCGSupport.ALWAYS
    else:
        assert md.workspace is None
        assert DiffKVVllmMetadataBuilder.get_cudagraph_support(cfg, kv_spec) == AttentionCGSupport.NEVER


def test_cuda_graph_support_follows_kernel_capabilities(monkeypatch):
    cfg = VllmConfig()
    monkeypatch.setattr(DiffKVVllmBackend, "kernel_backend", "auto")  # Triton on CUDA
    assert TritonBackend.supports_feature(diffkv.Feature.CUDA_GRAPH)
    assert DiffKVVllmMetadataBuilder.get_cudagraph_support(cfg, None) == AttentionCGSupport.ALWAYS
    monkeypatch.setattr(DiffKVVllmBackend, "kernel_backend", "reference")  # reads metadata on the host
    assert DiffKVVllmMetadataBuilder.get_cudagraph_support(cfg, None) == AttentionCGSupport.NEVER


def test_metadata_builder_rejects_bad_or_unsupported_metadata():
    cfg = VllmConfig()
    spec = spec_for(64, 32, seqs=SMALL)
    (layer,), (batch,) = build_layers(cfg, [("model.layers.0.self_attn.attn", spec, LayerFeatures())])
    with set_current_vllm_config(cfg):
        builder = DiffKVVllmMetadataBuilder(layer.get_kv_cache_spec(cfg), [layer.layer_name], cfg, CPU)
    builder.build(0, vllm_common(batch))  # fine
    cases = [
        (dict(query_start_loc=batch.query_start_loc.long()), MetadataError, "query_start_loc has dtype torch.int64"),
        (dict(block_table_tensor=batch.block_table[0]), MetadataError, "block_table_tensor has shape"),
        (dict(query_start_loc_cpu=torch.tensor([0, 3, 2], dtype=torch.int32)), MetadataError, "decreases at request 1"),
        (dict(query_start_loc_cpu=torch.tensor([1, 3, 4], dtype=torch.int32)), MetadataError, r"\[0\]=1"),
        (dict(num_actual_tokens=2), MetadataError, "exceeds num_actual_tokens=2"),
        (dict(num_reqs=3), MetadataError, "num_reqs=3"),
        (dict(causal=False), UnsupportedConfigError, "non-causal attention"),
        (dict(causal=torch.tensor([True, False])), UnsupportedConfigError, "per-request causal flags"),
        (dict(mm_req_doc_ranges={0: [(0, 2)]}), UnsupportedConfigError, "mm_req_doc_ranges"),
        (dict(rswa_prefix_lens=torch.tensor([1, 1], dtype=torch.int32)), UnsupportedConfigError, "R-SWA"),
    ]
    for override, err, match in cases:
        with pytest.raises(err, match=match):
            builder.build(0, vllm_common(batch, **override))


def test_metadata_builder_rejects_unsupported_head_size_v():
    cfg = VllmConfig()
    spec = spec_for(64, 32, seqs=SMALL)
    (layer,), _ = build_layers(cfg, [("model.layers.0.self_attn.attn", spec, LayerFeatures())])
    kv_spec = dataclasses.replace(layer.get_kv_cache_spec(cfg), head_size_v=72)
    with set_current_vllm_config(cfg), pytest.raises(UnsupportedConfigError, match="head_size_v=72"):
        DiffKVVllmMetadataBuilder(kv_spec, [layer.layer_name], cfg, CPU)


# ----------------------------------------------------------------------------
# cache update + forward on vLLM-laid-out caches, against the reference
# ----------------------------------------------------------------------------

LAYOUTS = [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC, KVCacheLayout.BLNHC, KVCacheLayout.BLHNC]


@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_impl_cache_update_and_forward_match_reference(kernels, layout):
    """Two layers (same spec) sharing one allocation in vLLM's layout: the
    cache update writes exactly the new tokens (bit-exact, negative slots
    skipped, key rows past the slot mapping unread) into the transposed
    view, and the forward over num_actual_tokens matches the float64
    reference without touching padding rows."""
    cfg = VllmConfig()
    spec = spec_for(48, 32)
    feats = [FEATURES, LayerFeatures(sliding_window=13, alibi="linear", softcap=5.0)]  # one spec: same window
    layers, batches = build_layers(cfg, [(f"model.layers.{i}.self_attn.attn", dataclasses.replace(spec, seed=i), f)
                                         for i, f in enumerate(feats)])
    num_blocks = batches[0].kv_cache.shape[0]
    views = vllm_caches(cfg, layers, num_blocks, layout)
    if layout is KVCacheLayout.LBNHC:  # NHD: the diffkv view is contiguous
        assert views[0].transpose(1, 2).is_contiguous()
    else:
        assert not views[0].transpose(1, 2).is_contiguous()
    T = spec.num_tokens
    with set_current_vllm_config(cfg):
        builder = DiffKVVllmMetadataBuilder(layers[0].get_kv_cache_spec(cfg), [lay.layer_name for lay in layers], cfg,
                                            CPU)
    for layer, view, batch in zip(layers, views, batches):
        expected_cache = load_cache(view, batch)
        md = builder.build(0, vllm_common(batch, num_actual_tokens=T + 1))  # one padded token
        # key/value carry all T_pad rows (vLLM pads them); the slot mapping covers num_actual_tokens
        layer.impl.do_kv_cache_update(layer, batch.key, batch.value, view, md.slot_mapping)
        assert torch.equal(view.transpose(1, 2).isnan(), expected_cache.isnan())
        assert torch.equal(view.transpose(1, 2).nan_to_num(), expected_cache.nan_to_num()), "cache update not bit-exact"
        out = batch.fresh_out()
        res = layer.impl.forward(layer, batch.query, batch.key, batch.value, view, md, out)
        assert res is out
        check_output(out, batch, what=f"{NAME}[{kernels}, {layout.name}, {layer.layer_name}]")


@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_kernels_receive_vllm_storage_as_a_view(kernels, monkeypatch):
    """The adapter routes to diffkv's kernels (Triton or reference) and hands
    them vLLM's storage through the transpose: no copy."""
    cfg = VllmConfig()
    spec = spec_for(64, 32, seqs=SMALL)
    (layer,), (batch,) = build_layers(cfg, [("model.layers.0.self_attn.attn", spec, LayerFeatures())])
    (view,) = vllm_caches(cfg, [layer], batch.kv_cache.shape[0], KVCacheLayout.LBHNC)
    load_cache(view, batch, hide_new_tokens=False)
    impl_cls = TritonImpl if kernels == "triton" else ReferenceImpl
    seen = {}
    original = impl_cls._attention

    def spy(self, query, kv_cache, metadata, output):
        seen.update(impl=type(self), cache=kv_cache, query=query, output=output)
        return original(self, query, kv_cache, metadata, output)

    monkeypatch.setattr(impl_cls, "_attention", spy)
    with set_current_vllm_config(cfg):
        builder = DiffKVVllmMetadataBuilder(layer.get_kv_cache_spec(cfg), [layer.layer_name], cfg, CPU)
    out = batch.fresh_out()
    layer.impl.forward(layer, batch.query, None, None, view, builder.build(0, vllm_common(batch)), out)
    assert seen["impl"] is impl_cls
    assert seen["cache"].data_ptr() == view.data_ptr()
    assert seen["cache"].stride() == view.transpose(1, 2).stride()
    assert seen["query"].shape[0] == spec.num_tokens and seen["output"].data_ptr() == out.data_ptr()
    check_output(out, batch)


@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_vllm_attention_layer_end_to_end(kernels):
    """vLLM's own Attention.forward (custom ops unified_kv_cache_update and
    unified_attention_with_output, forward context, slot mapping per layer)
    on two layers with different Dv built the MiMo-V2 way (set_head_size_v
    before each layer), run after both were built."""
    cfg = VllmConfig()
    specs = [("model.layers.0.self_attn.attn", spec_for(48, 32, seed=1), FEATURES),
             ("model.layers.1.self_attn.attn", spec_for(48, 64, seed=2), LayerFeatures(sinks=True))]
    layers, batches = build_layers(cfg, specs)
    assert DiffKVVllmBackend.head_size_v == 64  # the class hint now holds the last layer's Dv
    metadata, slot_mappings, expected = {}, {}, {}
    T = batches[0].spec.num_tokens
    for layer, batch in zip(layers, batches):
        assert batch.spec.num_tokens == T
        (view,) = vllm_caches(cfg, [layer], batch.kv_cache.shape[0], KVCacheLayout.LBNHC)
        expected[layer.layer_name] = load_cache(view, batch)
        with set_current_vllm_config(cfg):
            builder = DiffKVVllmMetadataBuilder(layer.get_kv_cache_spec(cfg), [layer.layer_name], cfg, CPU)
        metadata[layer.layer_name] = builder.build(0, vllm_common(batch))
        slot_mappings[layer.layer_name] = metadata[layer.layer_name].slot_mapping
    with set_forward_context(metadata, cfg, slot_mapping=slot_mappings):
        outs = []
        for layer, batch in zip(layers, batches):
            H, Dv = batch.spec.num_heads, batch.spec.head_size_v
            out = layer(batch.query[:T].reshape(T, -1), batch.key[:T].reshape(T, -1), batch.value[:T].reshape(T, -1))
            assert out.shape == (T, H * Dv)
            outs.append(out.view(T, H, Dv))
    for layer, batch, out in zip(layers, batches, outs):
        cache = layer.kv_cache.transpose(1, 2)
        want = expected[layer.layer_name]
        assert torch.equal(cache.nan_to_num(), want.nan_to_num()) and torch.equal(cache.isnan(), want.isnan())
        ref = reference_f64(batch)[:T]
        diffkv.testing.assert_close(out, ref, DTYPE, what=f"{layer.layer_name} (Dv={batch.spec.head_size_v})")


@pytest.mark.parametrize("kernels", KERNELS, indirect=True)
def test_two_layers_with_different_dv_interleaved(kernels):
    """Dv is per layer: three layers (Dv 32, 64, 32) built one after another
    with set_head_size_v, then called in any order, each with its own
    builder (a KV-cache group per spec)."""
    cfg = VllmConfig()
    dvs = [32, 64, 32]
    specs = [(f"model.layers.{i}.self_attn.attn", spec_for(64, d, seqs=SMALL, seed=10 + i), LayerFeatures(sinks=i == 1))
             for i, d in enumerate(dvs)]
    layers, batches = build_layers(cfg, specs)
    for layer, d in zip(layers, dvs):
        assert layer.get_kv_cache_spec(cfg).head_size_v == d
    for layer, batch in reversed(list(zip(layers, batches))):
        (view,) = vllm_caches(cfg, [layer], batch.kv_cache.shape[0], KVCacheLayout.LBHNC)
        load_cache(view, batch)
        with set_current_vllm_config(cfg):
            builder = DiffKVVllmMetadataBuilder(layer.get_kv_cache_spec(cfg), [layer.layer_name], cfg, CPU)
        if kernels == "triton":
            assert builder.build(0, vllm_common(batch)).workspace.partial_out.numel() % (4 * batch.spec.head_size_v) == 0
        md = builder.build(0, vllm_common(batch))
        layer.impl.do_kv_cache_update(layer, batch.key, batch.value, view, md.slot_mapping)
        out = batch.fresh_out()
        layer.impl.forward(layer, batch.query, batch.key, batch.value, view, md, out)
        check_output(out, batch, what=f"{layer.layer_name} Dv={batch.spec.head_size_v}")


def test_cache_not_matching_the_layer_is_a_shape_error():
    cfg = VllmConfig()
    spec = spec_for(64, 32, seqs=SMALL)
    (layer,), (batch,) = build_layers(cfg, [("model.layers.0.self_attn.attn", spec, LayerFeatures())])
    wrong = torch.zeros(batch.kv_cache.shape[0], 2, 16, 64 + 48, dtype=DTYPE)  # Dv 48, layer says 32
    with pytest.raises(ShapeError, match="head_size_v=32"):
        layer.impl.do_kv_cache_update(layer, batch.key, batch.value, wrong, batch.slot_mapping)
    md = DiffKVMetadata(num_actual_tokens=4, max_query_len=3, query_start_loc=batch.query_start_loc, max_seq_len=21,
                        seq_lens=batch.seq_lens, block_table=batch.block_table, slot_mapping=batch.slot_mapping,
                        num_reqs=2)
    with pytest.raises(ShapeError, match="head_size_v=32"):
        layer.impl.forward(layer, batch.query, None, None, wrong, md, batch.fresh_out())


def test_process_weights_after_loading_refreshes_sinks():
    """Sinks reloaded in place after the first forward are picked up."""
    cfg = VllmConfig()
    spec = spec_for(64, 32, seqs=SMALL)
    feats = LayerFeatures(sinks=True)
    batch = make_batch(spec, feats)
    sinks = batch.sinks.to(DTYPE).clone()  # a model parameter in the model dtype: the impl keeps an fp32 copy
    batch.sinks = sinks
    layer = make_layer(cfg, "model.layers.0.self_attn.attn", spec, feats, batch)
    (view,) = vllm_caches(cfg, [layer], batch.kv_cache.shape[0], KVCacheLayout.LBHNC)
    load_cache(view, batch, hide_new_tokens=False)
    with set_current_vllm_config(cfg):
        builder = DiffKVVllmMetadataBuilder(layer.get_kv_cache_spec(cfg), [layer.layer_name], cfg, CPU)
    md = builder.build(0, vllm_common(batch))
    layer.impl.forward(layer, batch.query, None, None, view, md, batch.fresh_out())
    sinks.copy_(torch.linspace(-3, 3, sinks.shape[0]).to(DTYPE))  # weight reload (in place)
    layer.process_weights_after_loading(DTYPE)
    # fp32 copies made now, on the weights' device (not in a later, possibly captured, forward),
    # and shared by the layer's diffkv impls whatever their Dv
    impl = layer.impl
    assert list(impl._device_params) == [CPU]
    assert torch.equal(impl._device_params[CPU][1], sinks.float())
    assert impl._impl_for(64, CPU)._device_params is impl._device_params
    out = batch.fresh_out()
    layer.impl.forward(layer, batch.query, None, None, view, md, out)
    batch.sinks = sinks.float()
    check_output(out, batch)
