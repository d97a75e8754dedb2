"""How the suite drives a backend: exactly the calls an engine makes.

* impl from ``backend.get_impl_cls()`` constructed with the layer's
  arguments (vLLM's ``AttentionImpl`` arguments plus ``head_size_v``);
* metadata from ``backend.get_builder_cls()(KVCacheSpec, device,
  num_blocks=...)`` and ``build(0, CommonAttentionMetadata)``;
* ``impl.do_kv_cache_update(...)`` and ``impl.forward(...)``.

The expected output always comes from :func:`diffkv.reference.paged_attention`
run in float64, on the CPU, on the *same* (already rounded) inputs.
"""

from __future__ import annotations

import importlib
import sys

import torch

from diffkv.errors import UnsupportedConfigError
from diffkv.metadata import CommonAttentionMetadata, KVCacheSpec
from diffkv.reference.attention import gather_sequence_kv
from diffkv.reference.attention import paged_attention as reference_paged_attention
from diffkv.testing.batches import Batch, BatchSpec, LayerFeatures, SeqShape
from diffkv.testing.tolerances import compare, logit_rounding_atol

from conformance.core import CaseFailure

BUILTIN = {
    "reference": "diffkv.reference.backend:ReferenceBackend",
    "triton": "diffkv.triton.backend:TritonBackend",
}


def load_backend(backend: str | type) -> tuple[type, str]:
    """``(backend class, import path for reproducers)`` from a class, a
    builtin name (``reference``, ``triton``) or ``"package.module:Class"``."""
    if isinstance(backend, type):
        return backend, class_path(backend)
    path = BUILTIN.get(backend, backend)
    if ":" not in path:
        raise ValueError(
            f"backend={backend!r}; expected 'package.module:BackendClass' or one of {sorted(BUILTIN)}"
        )
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"backend={backend!r}: {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type):
        raise ValueError(f"backend={backend!r} is a {type(obj).__name__}; expected a backend class")
    return obj, path


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def importable_path(ctx) -> str | None:
    """The backend's import path if importing it gives back the same class
    (needed by ``diffkv.paged_attention(backend=...)``), else None."""
    path = ctx.backend_ref
    module_name, _, attr = path.partition(":")
    module = sys.modules.get(module_name)
    try:
        module = module or importlib.import_module(module_name)
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001
        return None
    return path if obj is ctx.backend else None


# --------------------------------------------------------------------------- batches
def owned_rows(batch: Batch) -> int:
    return int(batch.query_start_loc[-1])


def describe_case(spec: BatchSpec, features: LayerFeatures | None = None) -> str:
    f = "" if features is None else f"; features {features_text(features)}"
    return spec.describe() + f


def features_text(f: LayerFeatures) -> str:
    parts = [n for n in f.names()]
    if f.sliding_window is not None:
        parts[parts.index("sliding_window")] = f"sliding_window={f.sliding_window}"
    if f.softcap is not None:
        parts[parts.index("softcap")] = f"softcap={f.softcap}"
    scale = "Dqk**-0.5" if f.scale is None else f"{f.scale}"
    return (", ".join(parts) or "none") + f" (scale={scale})"


def locate_row(batch: Batch, t: int) -> str:
    """'sequence s (q_len, context_len), query row i (position p)' for output row t."""
    qsl = batch.query_start_loc.tolist()
    sl = batch.seq_lens.tolist()
    for s in range(len(sl)):
        if qsl[s] <= t < qsl[s + 1]:
            q_len = qsl[s + 1] - qsl[s]
            ctx_len = sl[s] - q_len
            i = t - qsl[s]
            return (f"sequence {s} (q_len={q_len}, context_len={ctx_len}, seq_len={sl[s]}), "
                    f"query row {i} at position {ctx_len + i}")
    return f"padding row {t} (owned by no sequence)"


# --------------------------------------------------------------------------- backend calls
def make_impl(backend: type, batch: Batch, **overrides):
    kwargs = batch.impl_kwargs()
    kwargs.update(overrides)
    return backend.get_impl_cls()(**kwargs)


def common_metadata(batch: Batch, **overrides) -> CommonAttentionMetadata:
    """The engine's description of the batch, host copies included."""
    qsl = overrides.pop("query_start_loc", batch.query_start_loc)
    sl = overrides.pop("seq_lens", batch.seq_lens)
    bt = overrides.pop("block_table", batch.block_table)
    qsl_cpu = qsl.detach().cpu()
    sl_cpu = sl.detach().cpu()
    q_lens = (qsl_cpu[1:] - qsl_cpu[:-1]).tolist()
    fields = dict(
        query_start_loc=qsl,
        seq_lens=sl,
        block_table_tensor=bt,
        slot_mapping=batch.slot_mapping,
        num_reqs=int(sl.shape[0]),
        num_actual_tokens=int(qsl_cpu[-1]) if qsl_cpu.numel() else 0,
        max_query_len=max(q_lens, default=0),
        max_seq_len=int(sl_cpu.max()) if sl_cpu.numel() else 0,
        query_start_loc_cpu=qsl_cpu,
        seq_lens_cpu=sl_cpu,
    )
    fields.update(overrides)
    return CommonAttentionMetadata(**fields)


def kv_cache_spec(batch: Batch) -> KVCacheSpec:
    s = batch.spec
    return KVCacheSpec(
        block_size=s.block_size, num_kv_heads=s.num_kv_heads, num_heads=s.num_heads, head_size=s.head_size,
        head_size_v=s.head_size_v, dtype=s.dtype, max_num_seqs=max(1, len(s.seqs)),
        max_num_batched_tokens=max(1, batch.query.shape[0]),
    )


def build_metadata(backend: type, batch: Batch, common: CommonAttentionMetadata | None = None,
                   num_blocks: int | None = None):
    builder = backend.get_builder_cls()(
        kv_cache_spec(batch), batch.query.device,
        num_blocks=batch.kv_cache.shape[0] if num_blocks is None else num_blocks,
    )
    return builder.build(0, common if common is not None else common_metadata(batch))


def forward(backend: type, batch: Batch, *, impl=None, kv_cache: torch.Tensor | None = None,
            out: torch.Tensor | None = None, metadata=None) -> torch.Tensor:
    """One layer's forward through the class API. Returns ``out``."""
    impl = impl if impl is not None else make_impl(backend, batch)
    md = metadata if metadata is not None else build_metadata(backend, batch)
    out = batch.fresh_out() if out is None else out
    ret = impl.forward(None, batch.query, batch.key, batch.value,
                       batch.kv_cache if kv_cache is None else kv_cache, md, out)
    if ret is not None and ret is not out and not (
        isinstance(ret, torch.Tensor) and ret.data_ptr() == out.data_ptr() and ret.shape == out.shape
    ):
        raise CaseFailure("forward must write into the output buffer it was given and return it; "
                          f"it returned a different tensor ({type(ret).__name__})")
    return out


def reference_output(batch: Batch, kv_cache: torch.Tensor | None = None) -> torch.Tensor:
    """Expected output [T_pad, H, Dv], float64 on the CPU (padding rows: 0)."""
    cache = batch.kv_cache if kv_cache is None else kv_cache
    kw = batch.attention_kwargs()
    if kw["alibi_slopes"] is not None:
        kw["alibi_slopes"] = kw["alibi_slopes"].detach().cpu().double()
    if kw["sinks"] is not None:
        kw["sinks"] = kw["sinks"].detach().cpu().double()
    q = batch.query.detach().cpu().double()
    out = torch.zeros(q.shape[0], q.shape[1], cache.shape[-1] - q.shape[-1], dtype=torch.float64)
    return reference_paged_attention(
        q, cache.detach().cpu().double(), batch.query_start_loc.cpu(), batch.seq_lens.cpu(),
        batch.block_table.cpu(), out=out, **kw,
    )


# --------------------------------------------------------------------------- comparisons
def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (so NaN == NaN and -0 != +0), on the CPU."""
    t = t.detach().contiguous().cpu()
    if t.dtype.is_floating_point:
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
        return t.view(view)
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def first_bit_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
    if a.shape != b.shape:
        return None
    diff = bits(a) != bits(b)
    if not diff.any():
        return None
    return tuple(int(i) for i in torch.nonzero(diff)[0])


def logit_allowance(batch: Batch, kv_cache: torch.Tensor | None = None) -> torch.Tensor:
    """[T_pad, H, 1] extra tolerance for rounding of huge logits
    (:func:`diffkv.testing.tolerances.logit_rounding_atol`): per query row and
    head, ``L = scale * max_j sum_d |q_d k_jd|`` over the sequence's keys,
    times ``max |V|`` of the sequence."""
    cache = (batch.kv_cache if kv_cache is None else kv_cache).detach().cpu().double()
    q = batch.query.detach().cpu().double().abs()
    T_pad, H, Dqk = q.shape
    Hkv = cache.shape[2]
    L = torch.zeros(T_pad, H, 1, dtype=torch.float64)
    vmax = torch.zeros(T_pad, 1, 1, dtype=torch.float64)
    qsl = batch.query_start_loc.tolist()
    for s, seq_len in enumerate(batch.seq_lens.tolist()):
        start, end = qsl[s], qsl[s + 1]
        if end == start or seq_len == 0:
            continue
        k, v = gather_sequence_kv(cache, batch.block_table[s].cpu(), seq_len, Dqk)
        k = k.abs().repeat_interleave(H // Hkv, dim=1)  # [seq_len, H, Dqk]
        L[start:end, :, 0] = abs(batch.scale) * torch.einsum("qhd,khd->qhk", q[start:end], k).amax(dim=-1)
        vmax[start:end] = v.abs().max()
    return logit_rounding_atol(batch.spec.dtype, L, vmax)


def check_output(feature: str, batch: Batch, out: torch.Tensor, expected: torch.Tensor,
                 kv_cache: torch.Tensor | None = None) -> None:
    """Owned rows agree with the float64 reference under the dtype's tolerance
    (plus the logit-rounding allowance, which only matters for huge logits)."""
    T = owned_rows(batch)
    extra = logit_allowance(batch, kv_cache)[:T]
    cmp = compare(out[:T], expected[:T], batch.spec.dtype, what="output", extra_atol=extra)
    if not cmp.ok:
        where = ""
        if cmp.worst_index is not None:
            t, h = cmp.worst_index[0], cmp.worst_index[1]
            where = f"; first bad element in {locate_row(batch, t)}, head {h}"
        raise CaseFailure(f"[{feature}] output differs from the float64 reference: {cmp.message}{where}")


def check_untouched(feature: str, what: str, before: torch.Tensor, after: torch.Tensor, doing: str) -> None:
    idx = first_bit_difference(before, after)
    if before.shape != after.shape:
        raise CaseFailure(f"[{feature}] {what} changed shape while {doing}")
    if idx is not None:
        raise CaseFailure(
            f"[{feature}] {what} was modified while {doing} (first changed element at index {list(idx)}: "
            f"{float(before[idx]):.6g} -> {float(after[idx]):.6g}); it must stay untouched"
        )


def check_padding_untouched(feature: str, batch: Batch, out: torch.Tensor) -> None:
    """Rows past ``query_start_loc[-1]`` were NaN before the call and must still be."""
    T = owned_rows(batch)
    pad = out[T:]
    if pad.numel() and not torch.isnan(pad).all():
        bad = torch.nonzero(~torch.isnan(pad))[0]
        raise CaseFailure(
            f"[{feature}] output padding row {T + int(bad[0])} (past query_start_loc[-1]={T}, owned by no "
            f"sequence) was written (head {int(bad[1])} holds {float(pad[tuple(bad)]):.6g}); rows not "
            "owned by a sequence must never be written"
        )


def describe_exception(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ")
    if len(text) > 400:
        text = text[:400] + "..."
    return f"{type(e).__name__}: {text}"


def unexpected(feature: str, e: BaseException, doing: str) -> CaseFailure:
    if isinstance(e, UnsupportedConfigError):
        return CaseFailure(
            f"[{feature}] raised UnsupportedConfigError while {doing}, but the backend declares this "
            f"configuration supported: {e.reasons}"
        )
    return CaseFailure(f"[{feature}] raised {describe_exception(e)} while {doing}")


# --------------------------------------------------------------------------- reproducers
_SPEC_DEFAULTS = BatchSpec(seqs=())


def spec_repr(spec: BatchSpec) -> str:
    """``BatchSpec(...)`` with the non-default fields only (valid Python)."""
    seqs = ", ".join(f"SeqShape(q_len={s.q_len}, context_len={s.context_len})" for s in spec.seqs)
    parts = [f"seqs=({seqs}{',' if len(spec.seqs) == 1 else ''})"]
    for name in ("num_heads", "num_kv_heads", "head_size", "head_size_v", "block_size", "dtype", "padding_rows",
                 "extra_blocks", "extra_block_table_cols", "permute_blocks", "poison_cache",
                 "poison_block_table", "seed"):
        v = getattr(spec, name)
        if name in ("num_heads", "num_kv_heads", "head_size", "head_size_v", "block_size", "dtype") or \
                v != getattr(_SPEC_DEFAULTS, name):
            parts.append(f"{name}={v!r}")
    return f"BatchSpec({', '.join(parts)})"


def features_repr(f: LayerFeatures) -> str:
    parts = []
    for name, default in (("sliding_window", None), ("softcap", None), ("alibi", None), ("sinks", False),
                          ("scale", None)):
        v = getattr(f, name)
        if v != default:
            parts.append(f"{name}={v!r}")
    return f"LayerFeatures({', '.join(parts)})"


def case_repr(arg) -> str:
    if isinstance(arg, BatchSpec):
        return spec_repr(arg)
    if isinstance(arg, LayerFeatures):
        return features_repr(arg)
    return repr(arg)


def reproducer(ctx, check_id: str, case: tuple) -> str:
    """Python code that re-runs one case of one check."""
    args = "".join(f",\n    {case_repr(a)}" for a in case)
    imports = ["import torch", "from diffkv.testing import BatchSpec, LayerFeatures, SeqShape"]
    for a in case:
        if not isinstance(a, (BatchSpec, LayerFeatures, int, float, str, bool, type(None))):
            line = f"from {type(a).__module__} import {type(a).__name__}"
            if line not in imports:
                imports.append(line)
    imports.append("from conformance import reproduce")
    code = (
        "\n".join(imports) + "\n"
        f"reproduce(\n    {ctx.backend_ref!r}, {check_id!r}{args},\n"
        f"    device={ctx.device.type!r},\n)"
    )
    if len(case) == 2 and isinstance(case[0], BatchSpec) and isinstance(case[1], LayerFeatures):
        code += (
            "\n# the same tensors by hand (class API: impl.forward; functional API shown):\n"
            f"# b = diffkv.testing.make_batch({case_repr(case[0])}, {case_repr(case[1])}, device={ctx.device.type!r})\n"
            "# out = diffkv.paged_attention(b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table,\n"
            f"#                             out=b.fresh_out(), backend={ctx.backend_ref!r}, **b.attention_kwargs())\n"
            "# reference: diffkv.reference.paged_attention on b.query.double(), b.kv_cache.double(), ..."
        )
    return code


__all__ = [
    "BUILTIN",
    "Batch",
    "BatchSpec",
    "LayerFeatures",
    "SeqShape",
    "build_metadata",
    "check_output",
    "check_padding_untouched",
    "check_untouched",
    "class_path",
    "common_metadata",
    "forward",
    "load_backend",
    "make_impl",
    "reference_output",
    "reproducer",
    "same_bits",
]
