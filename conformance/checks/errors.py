"""SPEC section 4: the two kinds of errors.

* Everything the backend does not declare (a feature, a dtype, a block size,
  a head size, GQA, a quantized cache, chunked attention with lookback,
  encoder attention, fused output quantization, cascade metadata) must be
  refused with :class:`diffkv.UnsupportedConfigError` carrying ``.reasons``
  -- by ``validate_configuration`` and at construction / build / forward --
  leaving output and cache untouched. Row status: *unsupported, correctly
  rejected*.
* Malformed input must raise ``ValueError`` (or a subclass) whose message
  names the argument, and leave output and cache untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import diffkv
from diffkv.errors import UnsupportedConfigError
from diffkv.testing.batches import BatchSpec, LayerFeatures, make_batch

from conformance.checks.semantics import base_spec
from conformance.core import OPTIONAL_FEATURES, STANDARD_DTYPES, CaseFailure, Check, Context, Status
from conformance.harness import (
    build_metadata,
    common_metadata,
    describe_exception,
    first_bit_difference,
    importable_path,
    make_impl,
)
from conformance.runner import result, static_check, targeted_check

SEC_UNSUP = "unsupported"
SEC_BAD = "malformed input"

FEATURE_ON = {
    "sliding_window": LayerFeatures(sliding_window=8),
    "softcap": LayerFeatures(softcap=5.0),
    "alibi": LayerFeatures(alibi="linear"),
    "alibi_sqrt": LayerFeatures(alibi="sqrt"),
    "sinks": LayerFeatures(sinks=True),
}
QUANTIZED_CACHE_DTYPES = ("fp8", "fp8_e5m2", "int8_per_token_head")
ENCODER_TYPES = ("encoder", "encoder_only", "encoder_decoder")
HEAD_SIZE_PROBES = (16, 40, 512)


def _spec(ctx: Context, **kw) -> BatchSpec:
    """Two sequences; the first spans two blocks (q_len 3 on block_size + 2 cached keys)."""
    bs = ctx.plan.draw_block_sizes[0]
    return base_spec(ctx, ((3, bs + 2), (1, 9)), **kw)


def _watch(**tensors) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if v is not None}


def _snapshot(watch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in watch.items()}


def _check_untouched(feature: str, watch, before, doing: str) -> None:
    for name, t in watch.items():
        idx = first_bit_difference(before[name], t)
        if idx is not None:
            raise CaseFailure(
                f"[{feature}] {name} was modified ({name}{list(idx)}: {float(before[name][idx]):.6g} -> "
                f"{float(t[idx]):.6g}) by {doing} that raised; a refused call must leave it untouched"
            )


# --------------------------------------------------------------------------- unsupported
def expect_unsupported(feature: str, attempt: Callable[[], object], watch: dict[str, torch.Tensor],
                       doing: str) -> None:
    before = _snapshot(watch)
    try:
        attempt()
    except UnsupportedConfigError as e:
        reasons = getattr(e, "reasons", None)
        if not isinstance(reasons, list) or not reasons or not all(isinstance(r, str) and r for r in reasons):
            raise CaseFailure(f"[{feature}] UnsupportedConfigError raised by {doing} carries no reasons "
                              f"(.reasons={reasons!r}); expected a non-empty list of sentences") from None
    except Exception as e:  # noqa: BLE001
        raise CaseFailure(
            f"[{feature}] is declared unsupported, but {doing} raised {describe_exception(e)}; expected "
            "diffkv.UnsupportedConfigError with reasons"
        ) from None
    else:
        raise CaseFailure(
            f"[{feature}] is declared unsupported, but {doing} did not raise; expected "
            "diffkv.UnsupportedConfigError with reasons (a backend must refuse what it does not declare)"
        )
    _check_untouched(feature, watch, before, doing)


def expect_reasons(ctx: Context, feature: str, minimum: int = 1, **config) -> list[str]:
    args = dict(head_size=ctx.plan.draw_pairs[0][0], head_size_v=ctx.plan.draw_pairs[0][1])
    args.update(config)
    try:
        reasons = ctx.backend.validate_configuration(**args)
    except Exception as e:  # noqa: BLE001
        raise CaseFailure(f"[{feature}] validate_configuration({_kw(config)}) raised {describe_exception(e)}; "
                          "expected it to return the list of reasons") from None
    if not isinstance(reasons, list) or not all(isinstance(r, str) and r for r in reasons):
        raise CaseFailure(f"[{feature}] validate_configuration({_kw(config)}) returned {reasons!r}; expected a "
                          "list of reason strings")
    if len(reasons) < minimum:
        raise CaseFailure(
            f"[{feature}] validate_configuration({_kw(config)}) returned {reasons!r}; expected "
            f"{'at least ' + str(minimum) + ' reasons' if minimum > 1 else 'a reason'} (the backend does not "
            "declare this configuration)"
        )
    return reasons


def _kw(config) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def _config_of(spec: BatchSpec, f: LayerFeatures, device) -> dict:
    return dict(
        head_size=spec.head_size, head_size_v=spec.head_size_v, dtype=spec.dtype, block_size=spec.block_size,
        num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, use_alibi=f.alibi is not None,
        use_alibi_sqrt=f.alibi == "sqrt", use_sinks=f.sinks, sliding_window=f.sliding_window,
        logits_soft_cap=f.softcap, device=device,
    )


def _engine_call(ctx: Context, batch, out, **impl_overrides):
    """construct -> build -> forward (where an engine would meet the refusal)."""

    def attempt():
        impl = make_impl(ctx.backend, batch, **impl_overrides)
        md = build_metadata(ctx.backend, batch)
        impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache, md, out)

    return attempt


def rejected_batch_case(ctx: Context, feature: str, spec: BatchSpec, features: LayerFeatures) -> None:
    """A batch outside the declared capabilities: refused by validate_configuration,
    by the engine path and by the functional API."""
    expect_reasons(ctx, feature, **_config_of(spec, features, ctx.device))
    batch = make_batch(spec, features, device=ctx.device)
    out = batch.fresh_out()
    expect_unsupported(feature, _engine_call(ctx, batch, out), _watch(output=out, kv_cache=batch.kv_cache),
                       "construct + build + forward")
    path = importable_path(ctx)
    if path is not None:
        out2 = batch.fresh_out()
        expect_unsupported(
            feature,
            lambda: diffkv.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens,
                                           batch.block_table, out=out2, backend=path, **batch.attention_kwargs()),
            _watch(output=out2, kv_cache=batch.kv_cache), "diffkv.paged_attention(backend=...)",
        )


def _reject_row(check_id: str, section: str, feature: str, spec_fn, features: LayerFeatures) -> Check:
    def rerun(ctx, spec, f):
        rejected_batch_case(ctx, feature, spec, f)

    def run(ctx):
        return targeted_check(ctx, check, [(spec_fn(ctx), features)], rerun,
                              passed="refused with UnsupportedConfigError (validate_configuration, engine path, "
                                     "functional API)", status=Status.REJECTED)

    check = Check(check_id, section, feature, run=run, rerun=rerun)
    return check


def _special_row(check_id: str, feature: str, body: Callable[[Context], None], passed: str) -> Check:
    def rerun(ctx):
        body(ctx)

    def run(ctx):
        return targeted_check(ctx, check, [()], rerun, passed=passed, status=Status.REJECTED)

    check = Check(check_id, SEC_UNSUP, feature, run=run, rerun=rerun)
    return check


def unsupported_checks(ctx: Context) -> list[Check]:
    caps, plan = ctx.caps, ctx.plan
    if not plan.runnable:
        return []
    checks: list[Check] = []
    dqk0, dv0 = plan.draw_pairs[0]
    for feat in OPTIONAL_FEATURES:
        if feat not in plan.features:
            checks.append(_reject_row(f"feature/{feat}", "semantics", feat, lambda c: _spec(c), FEATURE_ON[feat]))
    if "gqa" not in caps.features:
        checks.append(_reject_row("gqa", "semantics", "GQA (num_heads > num_kv_heads)",
                                  lambda c: _spec(c, num_heads=4, num_kv_heads=2), LayerFeatures()))
    for dt in STANDARD_DTYPES:
        name = str(dt).replace("torch.", "")
        if dt in plan.excluded_dtypes:
            checks.append(static_check(f"dtype/{name}", "semantics", f"dtype {name}", Status.SKIPPED,
                                       "declared; excluded from this run (--dtypes)"))
        elif dt not in tuple(caps.dtypes):
            checks.append(_reject_row(f"dtype/{name}", "semantics", f"dtype {name}",
                                      lambda c, dt=dt: _spec(c, dtype=dt), LayerFeatures()))
    m, mx = caps.block_size_multiple, caps.max_block_size
    probes = sorted({b for b in (m // 2, m + m // 2, 2 * mx) if b >= 1 and (b % m != 0 or b > mx)})
    for bs in probes:
        checks.append(_reject_row(f"block_size/{bs}", "semantics", f"block_size {bs}",
                                  lambda c, bs=bs: _spec(c, block_size=bs), LayerFeatures()))
    for probe in HEAD_SIZE_PROBES:
        if probe not in caps.head_sizes:
            checks.append(_reject_row(f"head_size/{probe}x{dv0}", "semantics", f"head sizes Dqk={probe}, Dv={dv0}",
                                      lambda c, p=probe: _spec(c, head_size=p), LayerFeatures()))
        if probe not in caps.head_sizes_v:
            checks.append(_reject_row(f"head_size/{dqk0}x{probe}", "semantics", f"head sizes Dqk={dqk0}, Dv={probe}",
                                      lambda c, p=probe: _spec(c, head_size_v=p), LayerFeatures()))

    # configurations outside diffkv's contract, refused at construction or forward
    for q in QUANTIZED_CACHE_DTYPES:
        feature = f"kv_cache_dtype={q!r}"
        if q in tuple(caps.kv_cache_dtypes):
            checks.append(static_check(f"kv_cache_dtype/{q}", SEC_UNSUP, feature, Status.SKIPPED,
                                       "declared; SPEC section 2 does not define quantized-cache numerics, so the "
                                       "suite does not check them"))
            continue
        checks.append(_special_row(f"kv_cache_dtype/{q}", feature,
                                   lambda c, q=q, feature=feature: _construct_refused(c, feature, kv_cache_dtype=q),
                                   "refused at construction and by validate_configuration"))
    checks.append(_special_row("unsupported/chunk_lookback", "chunked attention with lookback (chunk_lookback=64)",
                               lambda c: _construct_refused(c, "chunk_lookback", chunk_lookback=64),
                               "refused at construction and by validate_configuration"))
    for t in ENCODER_TYPES:
        checks.append(_special_row(f"unsupported/attn_type={t}", f"attn_type={t!r} (non-causal / encoder attention)",
                                   lambda c, t=t: _construct_refused(c, f"attn_type={t!r}", attn_type=t),
                                   "refused at construction and by validate_configuration"))
    checks.append(_special_row("unsupported/output_scale", "fused output quantization (output_scale)",
                               _output_scale_refused, "refused at forward and by validate_configuration"))
    checks.append(_special_row("unsupported/cascade", "cascade attention metadata (use_cascade=True)",
                               _cascade_refused, "refused at forward and by validate_configuration"))
    checks.append(_special_row("unsupported/all_reasons", "all reasons at once", _all_reasons,
                               "validate_configuration and UnsupportedConfigError list every reason"))
    return checks


def _construct_refused(ctx: Context, feature: str, **impl_overrides) -> None:
    validate = {k: v for k, v in impl_overrides.items() if k in ("kv_cache_dtype", "chunk_lookback", "attn_type")}
    expect_reasons(ctx, feature, **validate)
    batch = make_batch(_spec(ctx), device=ctx.device)
    out = batch.fresh_out()
    expect_unsupported(feature, _engine_call(ctx, batch, out, **impl_overrides),
                       _watch(output=out, kv_cache=batch.kv_cache), "construct + build + forward")


def _output_scale_refused(ctx: Context) -> None:
    feature = "output_scale"
    expect_reasons(ctx, feature, use_output_quant=True)
    batch = make_batch(_spec(ctx), device=ctx.device)
    impl, md = make_impl(ctx.backend, batch), build_metadata(ctx.backend, batch)
    out = batch.fresh_out()
    scale = torch.ones((), dtype=torch.float32, device=ctx.device)
    expect_unsupported(feature, lambda: impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache, md,
                                                     out, output_scale=scale),
                       _watch(output=out, kv_cache=batch.kv_cache), "forward(output_scale=...)")


def _cascade_refused(ctx: Context) -> None:
    feature = "cascade"
    expect_reasons(ctx, feature, use_cascade=True)
    batch = make_batch(_spec(ctx), device=ctx.device)
    impl, md = make_impl(ctx.backend, batch), build_metadata(ctx.backend, batch)
    md.use_cascade = True
    md.common_prefix_len = ctx.plan.draw_block_sizes[0]
    out = batch.fresh_out()
    expect_unsupported(feature, lambda: impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache, md,
                                                     out),
                       _watch(output=out, kv_cache=batch.kv_cache), "forward with attn_metadata.use_cascade=True")


def _all_reasons(ctx: Context) -> None:
    feature = "all reasons at once"
    config = dict(chunk_lookback=64, attn_type="encoder")
    if "fp8" not in tuple(ctx.caps.kv_cache_dtypes):
        config["kv_cache_dtype"] = "fp8"
    expect_reasons(ctx, feature, minimum=len(config), **config)
    batch = make_batch(_spec(ctx), device=ctx.device)
    try:
        make_impl(ctx.backend, batch, **config)
    except UnsupportedConfigError as e:
        if len(getattr(e, "reasons", []) or []) < len(config):
            raise CaseFailure(f"[{feature}] constructing with {_kw(config)} raised UnsupportedConfigError with "
                              f"reasons {getattr(e, 'reasons', None)!r}; expected one reason per unsupported "
                              f"setting ({len(config)})") from None
    except Exception as e:  # noqa: BLE001
        raise CaseFailure(f"[{feature}] constructing with {_kw(config)} raised {describe_exception(e)}; expected "
                          "UnsupportedConfigError") from None
    else:
        raise CaseFailure(f"[{feature}] constructing with {_kw(config)} did not raise")


# --------------------------------------------------------------------------- malformed input
@dataclass
class Malformed:
    check_id: str
    feature: str
    keywords: tuple[str, ...]
    make: Callable  # (ctx, batch) -> (attempt, watch, doing)
    when: Callable[[Context], bool] = lambda ctx: True


def _other_float(dt: torch.dtype) -> torch.dtype:
    return torch.float16 if dt != torch.float16 else torch.float32


def _fwd(ctx, batch, *, query=None, cache=None, out=None, md=None, impl=None):
    impl = impl if impl is not None else make_impl(ctx.backend, batch)
    md = md if md is not None else build_metadata(ctx.backend, batch)
    out = batch.fresh_out() if out is None else out
    cache = batch.kv_cache if cache is None else cache
    q = batch.query if query is None else query
    return (lambda: impl.forward(None, q, batch.key, batch.value, cache, md, out)), _watch(output=out, kv_cache=cache)


def _pipeline(ctx, batch, *, num_blocks=None, **common_overrides):
    """construct + build(common metadata with overrides) + forward."""
    impl = make_impl(ctx.backend, batch)
    out = batch.fresh_out()

    def attempt():
        md = build_metadata(ctx.backend, batch, common_metadata(batch, **common_overrides), num_blocks=num_blocks)
        impl.forward(None, batch.query, batch.key, batch.value, batch.kv_cache, md, out)

    return attempt, _watch(output=out, kv_cache=batch.kv_cache)


def _write(ctx, batch, *, key=None, value=None, cache=None, slots=None):
    impl = make_impl(ctx.backend, batch)
    cache = batch.kv_cache if cache is None else cache
    # fresh values (batch.key / value already sit in the cache): any premature write shows
    k = torch.randn_like(batch.key) if key is None else key
    v = torch.randn_like(batch.value) if value is None else value
    s = batch.slot_mapping if slots is None else slots
    return (lambda: impl.do_kv_cache_update(None, k, v, cache, s)), _watch(kv_cache=cache)


def _construct(ctx, batch, **overrides):
    return (lambda: make_impl(ctx.backend, batch, **overrides)), {}


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _functional_attention(ctx, batch, **overrides):
    path = importable_path(ctx)
    out = batch.fresh_out()
    args = dict(query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, block_table=batch.block_table)
    args.update(overrides)

    def attempt():
        diffkv.paged_attention(batch.query, batch.kv_cache, args["query_start_loc"], args["seq_lens"],
                               args["block_table"], out=out, backend=path, **batch.attention_kwargs())

    return attempt, _watch(output=out, kv_cache=batch.kv_cache)


def _functional_write(ctx, batch, slots):
    path = importable_path(ctx)
    return (lambda: diffkv.write_kv_cache(batch.key, batch.value, batch.kv_cache, slots, backend=path)), \
        _watch(kv_cache=batch.kv_cache)


def _dv_wrong(batch) -> int:
    s = batch.spec
    return s.head_size if s.head_size != s.head_size_v else s.head_size_v + 16


MALFORMED: tuple[Malformed, ...] = (
    Malformed("malformed/query_rank", "query of rank 2", ("query",),
              lambda c, b: (*_fwd(c, b, query=b.query[:, :, 0]), "forward")),
    Malformed("malformed/query_num_heads", "query with the wrong number of heads", ("query", "num_heads", "heads"),
              lambda c, b: (*_fwd(c, b, query=b.query.repeat(1, 2, 1)), "forward")),
    Malformed("malformed/query_head_size", "query head size != Dqk", ("query", "head_size", "kv_cache"),
              lambda c, b: (*_fwd(c, b, query=torch.cat([b.query, b.query[..., :16]], -1)), "forward")),
    Malformed("malformed/num_heads_not_multiple", "num_heads not a multiple of num_kv_heads",
              ("num_heads", "num_kv_heads"),
              lambda c, b: (*_construct(c, b, num_heads=3, num_kv_heads=2), "construction")),
    Malformed("malformed/sinks_length", "sinks of length != num_heads", ("sinks",),
              lambda c, b: (*_construct(c, b, sinks=torch.zeros(b.spec.num_heads + 1)), "construction"),
              when=lambda c: "sinks" in c.plan.features),
    Malformed("malformed/alibi_slopes_length", "alibi_slopes of length != num_heads", ("alibi",),
              lambda c, b: (*_construct(c, b, alibi_slopes=torch.zeros(b.spec.num_heads - 1),
                                        use_alibi_sqrt="alibi" not in c.plan.features), "construction"),
              when=lambda c: bool({"alibi", "alibi_sqrt"} & c.plan.features)),
    Malformed("malformed/kv_cache_dtype", "kv_cache dtype != query dtype", ("dtype",),
              lambda c, b: (*_fwd(c, b, cache=b.kv_cache.to(_other_float(b.spec.dtype))), "forward")),
    Malformed("malformed/kv_cache_last_dim", "kv_cache.shape[-1] != Dqk + Dv", ("kv_cache", "head_size"),
              lambda c, b: (*_fwd(c, b, cache=torch.cat([b.kv_cache, b.kv_cache[..., :16]], -1)), "forward")),
    Malformed("malformed/kv_cache_num_kv_heads", "kv_cache with the wrong number of KV heads",
              ("kv_cache", "num_kv_heads", "heads"),
              lambda c, b: (*_fwd(c, b, cache=b.kv_cache.repeat(1, 1, 2, 1)), "forward")),
    Malformed("malformed/output_dtype", "output dtype != query dtype", ("output",),
              lambda c, b: (*_fwd(c, b, out=b.fresh_out().to(_other_float(b.spec.dtype))), "forward")),
    Malformed("malformed/output_head_size", "output last dim != Dv (e.g. Dqk)", ("output",),
              lambda c, b: (*_fwd(c, b, out=torch.full((*b.out.shape[:2], _dv_wrong(b)), float("nan"),
                                                       dtype=b.out.dtype, device=b.out.device)), "forward")),
    Malformed("malformed/metadata_int64", "seq_lens of dtype int64 (metadata must be int32)", ("seq_lens", "int32"),
              lambda c, b: (*_pipeline(c, b, seq_lens=b.seq_lens.long()), "build + forward")),
    Malformed("malformed/seq_len_below_q_len", "seq_len < q_len", ("seq_len",),
              lambda c, b: (*_pipeline(c, b, seq_lens=_i32([2, 10], c.device)), "build + forward")),
    Malformed("malformed/block_table_too_short", "block table too short for seq_len", ("block_table",),
              lambda c, b: (*_pipeline(c, b, block_table=b.block_table[:, :1].contiguous()), "build + forward")),
    Malformed("malformed/block_id_out_of_range", "block id >= num_blocks in the block table", ("block_table",),
              lambda c, b: (*_pipeline(c, b, block_table=_bad_block(b)), "build + forward")),
    Malformed("malformed/query_start_loc_decreasing", "decreasing query_start_loc", ("query_start_loc",),
              lambda c, b: (*_pipeline(c, b, query_start_loc=_i32([0, 4, 3], c.device)), "build + forward")),
    Malformed("malformed/num_tokens_exceed_query", "query_start_loc[-1] beyond the query rows",
              ("query_start_loc", "num_actual_tokens", "query"),
              lambda c, b: (*_pipeline(c, b, query_start_loc=_i32([0, 3, b.query.shape[0] + 3], c.device)),
                            "build + forward")),
    Malformed("malformed/write_value_head_size", "cache write: value last dim != Dv", ("value",),
              lambda c, b: (*_write(c, b, value=torch.zeros(*b.value.shape[:2], _dv_wrong(b), dtype=b.value.dtype,
                                                            device=b.value.device)), "do_kv_cache_update")),
    Malformed("malformed/write_num_tokens", "cache write: key and value with different token counts", ("value",),
              lambda c, b: (*_write(c, b, value=torch.randn_like(b.value)[:-1]), "do_kv_cache_update")),
    Malformed("malformed/write_slot_mapping_dtype", "cache write: float slot_mapping", ("slot_mapping",),
              lambda c, b: (*_write(c, b, slots=b.slot_mapping.float()), "do_kv_cache_update")),
    Malformed("malformed/write_dtype", "cache write: key/value dtype != kv_cache dtype", ("dtype",),
              lambda c, b: (*_write(c, b, key=torch.randn_like(b.key).to(_other_float(b.spec.dtype)),
                                    value=torch.randn_like(b.value).to(_other_float(b.spec.dtype))),
                            "do_kv_cache_update")),
    Malformed("malformed/functional_seq_len_below_q_len", "functional API: seq_len < q_len", ("seq_len",),
              lambda c, b: (*_functional_attention(c, b, seq_lens=_i32([2, 10], c.device)), "diffkv.paged_attention"),
              when=lambda c: importable_path(c) is not None),
    Malformed("malformed/functional_slot_out_of_range", "functional API: slot >= num_blocks * block_size",
              ("slot_mapping",),
              lambda c, b: (*_functional_write(c, b, _bad_slots(b)), "diffkv.write_kv_cache"),
              when=lambda c: importable_path(c) is not None),
    Malformed("malformed/device_mismatch", "kv_cache on another device than query", ("device", "kv_cache"),
              lambda c, b: (*_fwd(c, b, cache=b.kv_cache.cpu()), "forward"),
              when=lambda c: c.device.type != "cpu"),
)


def _bad_block(b):
    bt = b.block_table.clone()
    bt[0, 0] = b.kv_cache.shape[0] + 7
    return bt


def _bad_slots(b):
    s = b.slot_mapping.clone()
    s[0] = b.kv_cache.shape[0] * b.kv_cache.shape[1] + 5
    return s


def malformed_case(ctx: Context, m: Malformed) -> None:
    batch = make_batch(_spec(ctx), device=ctx.device)
    try:
        attempt, watch, doing = m.make(ctx, batch)
    except Exception as e:  # noqa: BLE001 - setting up the valid parts must work
        raise CaseFailure(f"[{m.feature}] setting up a valid layer for this test raised {describe_exception(e)}") \
            from None
    before = _snapshot(watch)
    try:
        attempt()
    except ValueError as e:
        text = str(e).lower()
        if not any(k.lower() in text for k in m.keywords):
            raise CaseFailure(
                f"[{m.feature}] {doing} raised {type(e).__name__} whose message does not name the argument "
                f"(expected one of {list(m.keywords)}): {str(e)[:300]!r}"
            ) from None
    except Exception as e:  # noqa: BLE001
        raise CaseFailure(
            f"[{m.feature}] malformed input: {doing} raised {describe_exception(e)}; expected a ValueError "
            "(diffkv.InvalidInputError or a subclass) naming the argument"
        ) from None
    else:
        raise CaseFailure(f"[{m.feature}] malformed input was accepted: {doing} did not raise; expected ValueError")
    _check_untouched(m.feature, watch, before, doing)


def _malformed_check(m: Malformed) -> Check:
    def run(c: Context):
        try:
            malformed_case(c, m)
        except CaseFailure as e:
            return result(check, Status.FAIL, str(e), cases=1,
                          reproducer=f"from conformance import reproduce\nreproduce({c.backend_ref!r}, "
                                     f"{m.check_id!r}, device={c.device.type!r})")
        return result(check, Status.PASS, "ValueError naming the argument; output and cache untouched", cases=1)

    check = Check(m.check_id, SEC_BAD, m.feature, run=run, description=f"malformed input: {m.feature}")
    return check


def malformed_checks(ctx: Context) -> list[Check]:
    if not ctx.plan.runnable:
        return []
    return [_malformed_check(m) for m in MALFORMED if m.when(ctx)]


__all__ = ["MALFORMED", "malformed_checks", "unsupported_checks"]
