"""SPEC sections 2-3, behaviour around the numbers: untouched output padding,
the profiling run, determinism, the functional API, the vLLM cache layout
(any strides on dims 0-2), a whole engine step (cache write then
attention) and CUDA-graph capture."""

from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import strategies as st

import diffkv
from diffkv.testing.batches import BatchSpec, LayerFeatures, make_batch

from conformance.checks.semantics import MIXED, all_declared, base_spec, cases, check_declared_valid
from conformance.core import CaseFailure, Check, Context, Status
from conformance.harness import (
    build_metadata,
    check_output,
    check_padding_untouched,
    check_untouched,
    describe_case,
    first_bit_difference,
    forward,
    importable_path,
    make_impl,
    reference_output,
    unexpected,
)
from conformance.runner import property_check, static_check

SECTION = "behaviour"


def _guard(feature: str, spec: BatchSpec, features: LayerFeatures, doing: str):
    """Context manager: backend exceptions -> CaseFailure naming the feature and the case."""
    what = describe_case(spec, features)

    class _G:
        def __enter__(self):
            return self

        def __exit__(self, et, e, tb):
            if e is None:
                return False
            if isinstance(e, CaseFailure):
                raise CaseFailure(f"{e}\n  case: {what}") from None
            if isinstance(e, Exception):
                raise unexpected(feature, e, f"{doing} on {what}") from None
            return False

    return _G()


@st.composite
def padded_cases(draw, ctx: Context):
    spec, features = draw(cases(ctx, allow=ctx.plan.features))
    return replace(spec, padding_rows=draw(st.integers(1, 4))), features


# --------------------------------------------------------------------------- output padding
F_PAD = "output padding rows untouched"


def padding_case(ctx: Context, spec: BatchSpec, features: LayerFeatures) -> None:
    batch = make_batch(spec, features, device=ctx.device)
    with _guard(F_PAD, spec, features, "running forward"):
        out = forward(ctx.backend, batch)
        check_padding_untouched(F_PAD, batch, out)


# --------------------------------------------------------------------------- profiling run
F_PROFILE = "profiling run (attn_metadata=None) zero-fills output"


def profiling_case(ctx: Context, spec: BatchSpec, features: LayerFeatures) -> None:
    batch = make_batch(spec, features, device=ctx.device)
    before = batch.kv_cache.clone()
    out = batch.fresh_out()
    with _guard(F_PROFILE, spec, features, "running forward with attn_metadata=None"):
        impl = make_impl(ctx.backend, batch)
        impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache, None, out)
        if not (out == 0).all():
            bad = torch.nonzero(~(out == 0))[0].tolist()
            raise CaseFailure(
                f"[{F_PROFILE}] output[{bad[0]}, {bad[1]}, {bad[2]}] = {float(out[tuple(bad)]):.6g} after a "
                "profiling run; the whole output must be zero-filled"
            )
        check_untouched(F_PROFILE, "kv_cache", before, batch.kv_cache, "running a profiling forward")


# --------------------------------------------------------------------------- determinism
F_DET = "determinism"


def determinism_case(ctx: Context, spec: BatchSpec, features: LayerFeatures) -> None:
    batch = make_batch(spec, features, device=ctx.device)
    with _guard(F_DET, spec, features, "running forward twice"):
        impl = make_impl(ctx.backend, batch)
        first = forward(ctx.backend, batch, impl=impl)
        second = forward(ctx.backend, batch, impl=impl, metadata=build_metadata(ctx.backend, batch))
        idx = first_bit_difference(first, second)
        if idx is not None:
            raise CaseFailure(
                f"[{F_DET}] two identical forward calls differ at output index {list(idx)}: "
                f"{float(first[idx]):.9g} vs {float(second[idx]):.9g}; results must be bitwise reproducible"
            )


# --------------------------------------------------------------------------- functional API
F_FUNC = "functional API (diffkv.paged_attention / write_kv_cache)"


def functional_case(ctx: Context, spec: BatchSpec, features: LayerFeatures) -> None:
    batch = make_batch(spec, features, device=ctx.device)
    expected = reference_output(batch)
    path = importable_path(ctx)
    with _guard(F_FUNC, spec, features, "calling the functional API"):
        out = batch.fresh_out()
        if path is not None:
            ret = diffkv.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens,
                                         batch.block_table, out=out, backend=path, **batch.attention_kwargs())
        else:
            ret = ctx.backend.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens,
                                              batch.block_table, out=out, **batch.attention_kwargs())
        if ret is not None and ret.data_ptr() != out.data_ptr():
            raise CaseFailure(f"[{F_FUNC}] paged_attention(out=...) returned a tensor other than out")
        check_output(F_FUNC, batch, out, expected)
        check_padding_untouched(F_FUNC, batch, out)
        # cache write through the functional API: wipe the new tokens' slots, write them back
        cache = _wipe_new_slots(batch)
        if path is not None:
            diffkv.write_kv_cache(batch.key, batch.value, cache, batch.slot_mapping, backend=path)
        else:
            ctx.backend.write_kv_cache(batch.key, batch.value, cache, batch.slot_mapping)
        _expect_cache(F_FUNC, cache, batch.kv_cache, "write_kv_cache")


def _wipe_new_slots(batch, cache: torch.Tensor | None = None) -> torch.Tensor:
    cache = batch.kv_cache.clone() if cache is None else cache
    sm = batch.slot_mapping.cpu()
    BS = cache.shape[1]
    for slot in sm[sm >= 0].tolist():
        cache[slot // BS, slot % BS] = 0
    return cache


def _expect_cache(feature: str, got: torch.Tensor, want: torch.Tensor, doing: str) -> None:
    idx = first_bit_difference(want, got)
    if idx is not None:
        raise CaseFailure(
            f"[{feature}] kv_cache after {doing} differs from the expected bit-exact write at "
            f"[block {idx[0]}, offset {idx[1]}, kv head {idx[2]}, column {idx[3]}]: got {float(got[idx]):.9g}, "
            f"expected {float(want[idx]):.9g}"
        )


# --------------------------------------------------------------------------- vLLM layout
F_STRIDED = "kv_cache with any strides on dims 0-2 (vLLM layout)"


def strided_case(ctx: Context, spec: BatchSpec, features: LayerFeatures) -> None:
    """vLLM hands a [NB, Hkv, BS, D] cache viewed as [NB, BS, Hkv, D] (a transpose)."""
    batch = make_batch(spec, features, device=ctx.device)
    expected = reference_output(batch)
    view = batch.kv_cache.transpose(1, 2).contiguous().transpose(1, 2)
    with _guard(F_STRIDED, spec, features, "attending over a transposed cache view"):
        out = forward(ctx.backend, batch, kv_cache=view)
        check_output(F_STRIDED, batch, out, expected)
        target = _wipe_new_slots(batch, batch.kv_cache.transpose(1, 2).contiguous().transpose(1, 2))
        impl = make_impl(ctx.backend, batch)
        impl.do_kv_cache_update(None, batch.key, batch.value, target, batch.slot_mapping)
        _expect_cache(F_STRIDED, target, batch.kv_cache, "do_kv_cache_update on a transposed cache view")


# --------------------------------------------------------------------------- engine step
F_STEP = "engine step (do_kv_cache_update, then forward)"


def engine_step_case(ctx: Context, spec: BatchSpec, features: LayerFeatures) -> None:
    batch = make_batch(spec, features, device=ctx.device)
    expected = reference_output(batch)
    check_declared_valid(ctx, F_STEP, spec, features)
    cache = _wipe_new_slots(batch)
    with _guard(F_STEP, spec, features, "running a cache write and a forward"):
        impl = make_impl(ctx.backend, batch)
        impl.do_kv_cache_update(None, batch.key, batch.value, cache, batch.slot_mapping)
        out = forward(ctx.backend, batch, impl=impl, kv_cache=cache)
        check_output(F_STEP, batch, out, expected)


# --------------------------------------------------------------------------- CUDA graphs
F_GRAPH = "CUDA-graph capture of forward"


def cuda_graph_case(ctx: Context, spec: BatchSpec, features: LayerFeatures) -> None:
    batch = make_batch(spec, features, device=ctx.device)
    with _guard(F_GRAPH, spec, features, "capturing forward in a CUDA graph"):
        impl = make_impl(ctx.backend, batch)
        md = build_metadata(ctx.backend, batch)
        out = batch.fresh_out()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (compilation, autotuning) outside the graph
                impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache, md, out)
        torch.cuda.current_stream().wait_stream(stream)
        out.fill_(float("nan"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache, md, out)
        for step in range(2):
            if step:
                batch.query.copy_(torch.randn_like(batch.query))
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            check_output(F_GRAPH, batch, out, reference_output(batch))
            check_padding_untouched(F_GRAPH, batch, out)


# --------------------------------------------------------------------------- rows
def _row(check_id, feature, run_case, make, description=""):
    def run(ctx: Context):
        strategy, targeted, examples = make(ctx)
        return property_check(ctx, check, strategy=strategy, run_case=run_case, targeted=targeted, examples=examples)

    check = Check(check_id=check_id, section=SECTION, feature=feature, run=run, rerun=run_case,
                  description=description)
    return check


def behaviour_checks(ctx: Context) -> list[Check]:
    if not ctx.plan.runnable:
        return []
    n = ctx.profile.examples
    none = LayerFeatures()
    checks = [
        _row("output_padding", F_PAD, padding_case,
             lambda c: (padded_cases(c), [(base_spec(c, MIXED, padding_rows=3), all_declared(c)),
                                          (base_spec(c, ((0, 2), (0, 0)), padding_rows=2), none)], n(0.5)),
             "output rows past query_start_loc[-1] (NaN-poisoned) stay NaN"),
        _row("profiling_run", F_PROFILE, profiling_case,
             lambda c: (None, [(base_spec(c, MIXED, padding_rows=2), all_declared(c)),
                               (base_spec(c, ((1, 3),)), none)], 0)),
        _row("determinism", F_DET, determinism_case,
             lambda c: (cases(c, allow=c.plan.features),
                        [(base_spec(c, ((1, 300), (16, 100), (3, 5))), all_declared(c))], n(0.25))),
        _row("functional_api", F_FUNC, functional_case,
             lambda c: (cases(c, allow=c.plan.features), [(base_spec(c, MIXED), all_declared(c))], n(0.25))),
        _row("strided_kv_cache", F_STRIDED, strided_case,
             lambda c: (cases(c, allow=c.plan.features), [(base_spec(c, MIXED), none)], n(0.25))),
        _row("engine_step", F_STEP, engine_step_case,
             lambda c: (cases(c, allow=c.plan.features), [(base_spec(c, MIXED), all_declared(c))], n(0.5))),
    ]
    if "cuda_graph" not in ctx.caps.features:
        checks.append(static_check("cuda_graph", SECTION, F_GRAPH, Status.NOT_DECLARED,
                                   "the backend does not declare Feature.CUDA_GRAPH"))
    elif ctx.device.type != "cuda":
        checks.append(static_check("cuda_graph", SECTION, F_GRAPH, Status.SKIPPED,
                                   "declared; needs --device cuda to be checked"))
    else:
        checks.append(_row("cuda_graph", F_GRAPH, cuda_graph_case,
                           lambda c: (None, [(base_spec(c, MIXED, padding_rows=2), all_declared(c)),
                                             (base_spec(c, ((1, 700), (1, 5)), seed=1), none)], 0)))
    return checks


__all__ = ["behaviour_checks"]
