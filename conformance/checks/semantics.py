"""SPEC section 2: the backend's output agrees with the float64 reference.

One row per declared dtype, block size, (Dqk, Dv) pair, optional feature,
batch composition, plus GQA, feature combinations, block boundaries and
long contexts. Each row runs hypothesis-drawn cases (shared strategies of
:mod:`diffkv.testing.strategies`) and targeted cases where a typical bug
shows (windows at block boundaries, ALiBi with sinks and ``q_len > 1``,
huge logits under softcap, more than 1024 keys, ...).

Rows test their feature in isolation where they can (the ``base``,
``block_size``, ``head_size`` and ``batch`` rows use no optional feature), so
a failure points at the feature; ``dtype`` and ``combinations`` rows draw
every declared feature together.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from hypothesis import strategies as st

from diffkv.testing.batches import BatchSpec, LayerFeatures, SeqShape, make_batch
from diffkv.testing.strategies import SEQ_KINDS, batch_specs, layer_features, seq_shapes

from conformance.core import CaseFailure, Check, CheckResult, Context
from conformance.harness import (
    check_output,
    check_untouched,
    describe_case,
    forward,
    reference_output,
    unexpected,
)
from conformance.runner import property_check

SECTION = "semantics"
SOFTCAPS = (0.5, 5.0, 30.0)


# --------------------------------------------------------------------------- strategies
def specs(ctx: Context, *, dtypes=None, pairs=None, block_sizes=None, gqa_ratios=None, kinds=SEQ_KINDS,
          min_seqs=1, max_seqs=None, max_q_len=None, max_context_len=None, max_padding_rows=2):
    """Batches within what the backend declares and the profile's bounds."""
    p, plan = ctx.profile, ctx.plan
    return batch_specs(
        dtypes=dtypes or plan.dtypes,
        pairs=pairs or plan.draw_pairs,
        block_size_choices=block_sizes or plan.draw_block_sizes,
        max_kv_heads=p.max_kv_heads,
        gqa_ratios=gqa_ratios or plan.gqa_ratios,
        kinds=kinds,
        min_seqs=min_seqs,
        max_seqs=max_seqs or p.max_seqs,
        max_q_len=max_q_len or p.max_q_len,
        max_context_len=max_context_len if max_context_len is not None else p.max_context_len,
        max_padding_rows=max_padding_rows,
    )


@st.composite
def feature_sets(draw, ctx: Context, *, force=(), allow=(), max_window: int | None = None) -> LayerFeatures:
    """Layer features: ``force`` always on, ``allow`` maybe on (declared ones only)."""
    declared = ctx.plan.features
    allowed = (set(allow) | set(force)) & declared
    mw = max_window or (ctx.profile.max_context_len + ctx.profile.max_q_len)
    f = draw(layer_features(supported=allowed, max_window=mw))
    if "sliding_window" in force and f.sliding_window is None:
        f = replace(f, sliding_window=draw(st.integers(1, mw)))
    if "softcap" in force and f.softcap is None:
        f = replace(f, softcap=draw(st.sampled_from(SOFTCAPS)))
    if "alibi" in force:
        f = replace(f, alibi="linear")
    if "alibi_sqrt" in force:
        f = replace(f, alibi="sqrt")
    if "sinks" in force:
        f = replace(f, sinks=True)
    return f


def cases(ctx: Context, *, force=(), allow=(), **spec_kwargs):
    return st.tuples(specs(ctx, **spec_kwargs), feature_sets(ctx, force=force, allow=allow))


@st.composite
def boundary_specs(draw, ctx: Context):
    """Sequences whose lengths sit at block boundaries (k * block_size - 1, k * block_size, + 1)."""
    spec = draw(specs(ctx, max_seqs=1))
    b = spec.block_size
    seqs = []
    for _ in range(draw(st.integers(1, ctx.profile.max_seqs))):
        k = draw(st.integers(1, 3))
        seq_len = max(1, k * b + draw(st.sampled_from((-1, 0, 1))))
        q_len = draw(st.sampled_from(sorted({0, 1, min(2, seq_len), min(b, seq_len), seq_len})))
        seqs.append(SeqShape(q_len=q_len, context_len=seq_len - q_len))
    return replace(spec, seqs=tuple(seqs))


@st.composite
def long_specs(draw, ctx: Context):
    """One sequence with more than 1024 keys (plus maybe a short one)."""
    lo, hi = ctx.profile.long_context
    spec = draw(specs(ctx, max_seqs=1))
    seq_len = draw(st.integers(lo, hi))
    q_len = draw(st.sampled_from((1, 1, 2, 4, 8, 16)))
    seqs = [SeqShape(q_len=q_len, context_len=seq_len - q_len)]
    if draw(st.booleans()):
        seqs.append(draw(seq_shapes("decode", max_context_len=ctx.profile.max_context_len)))
    return replace(spec, seqs=tuple(draw(st.permutations(seqs))))


# --------------------------------------------------------------------------- one case
def attention_case(ctx: Context, feature: str, spec: BatchSpec, features: LayerFeatures) -> None:
    """Forward through the class API; owned rows must match the float64
    reference within the dtype's tolerance; the cache must stay untouched;
    a declared configuration must pass ``validate_configuration``."""
    what = describe_case(spec, features)
    batch = make_batch(spec, features, device=ctx.device)
    expected = reference_output(batch)
    check_declared_valid(ctx, feature, spec, features)
    before = batch.kv_cache.clone()
    try:
        out = forward(ctx.backend, batch)
        check_output(feature, batch, out, expected)
        check_untouched(feature, "kv_cache", before, batch.kv_cache, "running forward")
    except CaseFailure as e:
        raise CaseFailure(f"{e}\n  case: {what}") from None
    except Exception as e:  # noqa: BLE001
        raise unexpected(feature, e, f"running forward on {what}") from None


def check_declared_valid(ctx: Context, feature: str, spec: BatchSpec, features: LayerFeatures) -> None:
    reasons = ctx.backend.validate_configuration(
        head_size=spec.head_size, head_size_v=spec.head_size_v, dtype=spec.dtype, kv_cache_dtype="auto",
        block_size=spec.block_size, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        use_alibi=features.alibi is not None, use_alibi_sqrt=features.alibi == "sqrt", use_sinks=features.sinks,
        sliding_window=features.sliding_window, logits_soft_cap=features.softcap, device=ctx.device,
    )
    if reasons:
        raise CaseFailure(
            f"[{feature}] validate_configuration rejects a configuration made only of declared capabilities "
            f"({describe_case(spec, features)}): {reasons}"
        )


# --------------------------------------------------------------------------- targeted cases
def base_spec(ctx: Context, seqs, *, seed=0, **kw) -> BatchSpec:
    """A small hand-picked batch in the most precise declared dtype."""
    plan = ctx.plan
    gqa = "gqa" in ctx.caps.features
    fields = dict(
        seqs=tuple(SeqShape(q, c) for q, c in seqs),
        num_heads=4 if gqa else 2,
        num_kv_heads=2,
        head_size=plan.draw_pairs[0][0],
        head_size_v=plan.draw_pairs[0][1],
        block_size=plan.draw_block_sizes[0],
        dtype=plan.precise_dtype,
        padding_rows=1,
        seed=seed,
    )
    fields.update(kw)
    return BatchSpec(**fields)


def all_declared(ctx: Context, **kw) -> LayerFeatures:
    f = ctx.plan.features
    alibi = "linear" if "alibi" in f else ("sqrt" if "alibi_sqrt" in f else None)
    return LayerFeatures(
        sliding_window=kw.get("sliding_window", 9) if "sliding_window" in f else None,
        softcap=kw.get("softcap", 5.0) if "softcap" in f else None,
        alibi=kw.get("alibi", alibi) if alibi else None,
        sinks="sinks" in f,
        scale=kw.get("scale"),
    )


MIXED = ((1, 20), (4, 7), (0, 5), (9, 0))


# --------------------------------------------------------------------------- rows
def _row(check_id, feature, description, make):
    """A Check whose run() builds (strategy, targeted, examples) lazily."""

    def run(ctx: Context) -> CheckResult:
        strategy, targeted, examples = make(ctx)
        return property_check(ctx, check, strategy=strategy, run_case=rerun, targeted=targeted, examples=examples)

    def rerun(ctx: Context, spec, features) -> None:
        attention_case(ctx, feature, spec, features)

    check = Check(check_id=check_id, section=SECTION, feature=feature, run=run, rerun=rerun,
                  description=description)
    return check


def semantic_checks(ctx: Context) -> list[Check]:
    plan, prof = ctx.plan, ctx.profile
    if not plan.runnable:
        return []
    checks: list[Check] = []
    b0 = plan.draw_block_sizes[0]
    none = LayerFeatures()
    n = prof.examples

    checks.append(_row(
        "semantics/base", "causal attention", "mixed batches, no optional feature, every declared shape",
        lambda c: (cases(c), [(base_spec(c, MIXED), none), (base_spec(c, MIXED, seed=1, num_heads=2), none)], n()),
    ))
    for dt in plan.dtypes:
        name = str(dt).replace("torch.", "")
        checks.append(_row(
            f"dtype/{name}", f"dtype {name}", f"{name} inputs, every declared feature drawn",
            partial(lambda c, dt: (cases(c, dtypes=(dt,), allow=c.plan.features),
                                   [(base_spec(c, MIXED, dtype=dt), none),
                                    (base_spec(c, MIXED, dtype=dt, seed=2), all_declared(c))], n()), dt=dt),
        ))
    for bs in plan.block_sizes:
        checks.append(_row(
            f"block_size/{bs}", f"block_size {bs}", f"block size {bs}, sequences crossing block boundaries",
            partial(lambda c, bs: (cases(c, block_sizes=(bs,)),
                                   [(base_spec(c, ((1, 2 * bs + 1), (3, bs - 1), (min(bs + 2, 70), 0)),
                                               block_size=bs), none)], n(0.5)), bs=bs),
        ))
    for dqk, dv in plan.head_pairs:
        checks.append(_row(
            f"head_size/{dqk}x{dv}", f"head sizes Dqk={dqk}, Dv={dv}",
            f"Dqk={dqk}, Dv={dv} (Dv {'<' if dv < dqk else '>' if dv > dqk else '='} Dqk)",
            partial(lambda c, dqk, dv: (cases(c, pairs=((dqk, dv),)),
                                        [(base_spec(c, ((1, 20), (4, 7), (9, 0)), head_size=dqk, head_size_v=dv),
                                          none)], n(0.5)), dqk=dqk, dv=dv),
        ))
    if "gqa" in ctx.caps.features:
        checks.append(_row(
            "gqa", "GQA (num_heads > num_kv_heads)", "query head h reads KV head h // (H / Hkv)",
            lambda c: (cases(c, gqa_ratios=(2, 4, 8)),
                       [(base_spec(c, MIXED, num_heads=h, num_kv_heads=hkv, seed=h), none)
                        for h, hkv in ((4, 2), (8, 2), (8, 4), (12, 3))], n()),
        ))

    window_targets = sorted({w for w in (1, 2, b0 - 1, b0, b0 + 1, 2 * b0) if w >= 1})
    targeted_features = {
        "sliding_window": lambda c: [
            (base_spec(c, ((1, 2 * b0 + 3), (5, b0), (b0 + 3, 0)), seed=w), LayerFeatures(sliding_window=w))
            for w in window_targets
        ],
        "softcap": lambda c: [
            (base_spec(c, MIXED), LayerFeatures(softcap=0.5)),
            (base_spec(c, MIXED, seed=1), LayerFeatures(softcap=5.0, scale=20.0)),
            (base_spec(c, MIXED, seed=2), LayerFeatures(softcap=30.0, scale=1000.0)),  # huge logits: no NaN
        ],
        "alibi": lambda c: [
            (base_spec(c, ((12, 20), (1, 30), (16, 0)), seed=s), LayerFeatures(alibi="linear", sinks=sk))
            for s, sk in ((0, False), (1, True), (2, True))
        ],
        "alibi_sqrt": lambda c: [
            (base_spec(c, ((12, 20), (1, 30), (16, 0)), seed=s), LayerFeatures(alibi="sqrt", sinks=sk))
            for s, sk in ((0, False), (1, True))
        ],
        "sinks": lambda c: [
            (base_spec(c, MIXED, seed=s), LayerFeatures(sinks=True, scale=sc)) for s, sc in ((0, None), (1, 0.05))
        ],
    }
    # the alibi rows draw sinks too: "relative to the context length" is only observable with sinks
    companions = {"alibi": ("sinks",), "alibi_sqrt": ("sinks",)}
    for feat in ("sliding_window", "softcap", "alibi", "alibi_sqrt", "sinks"):
        if feat not in plan.features:
            continue
        checks.append(_row(
            f"feature/{feat}", feat, f"{feat} on, against the reference",
            partial(lambda c, feat: (cases(c, force=(feat,), allow=companions.get(feat, ())),
                                     [t for t in targeted_features[feat](c)
                                      if set(t[1].names()) <= c.plan.features], n()), feat=feat),
        ))
    if len(plan.features) >= 2:
        checks.append(_row(
            "feature/combinations", "feature combinations", "every declared feature drawn together",
            lambda c: (cases(c, allow=c.plan.features),
                       [(base_spec(c, MIXED, seed=3), all_declared(c)),
                        (base_spec(c, ((12, 20), (1, 30)), seed=4), all_declared(c, sliding_window=b0, softcap=0.5,
                                                                                   alibi="sqrt"))], n(1.5)),
        ))

    batch_rows = (
        ("decode", "decode (q_len = 1)", [(1, 0), (1, 1), (1, b0 - 1), (1, b0), (1, 3 * b0 + 5)]),
        ("multi_token_decode", "multi-token decode (1 < q_len <= 8 on a context)", [(2, 5), (4, b0), (8, 2 * b0 - 3),
                                                                                     (3, 1)]),
        ("chunked_prefill", "chunked prefill (q_len > 8 on a context)", [(12, 9), (10, b0)]),
        ("full_prefill", "full prefill (context_len = 0)", [(1, 0), (b0 + 5, 0), (7, 0)]),
        ("empty", "q_len = 0 sequences", [(0, 5), (3, 4), (0, 0), (1, 9), (0, b0)]),
    )
    for kind, feature, seqs in batch_rows:
        kinds = (kind,) if kind != "empty" else ("empty", "decode", "full_prefill", "multi_token_decode")
        extra = []
        if kind == "empty":
            extra = [((0, 3), (0, 0))]  # a step with no query row at all
        checks.append(_row(
            f"batch/{kind}", feature, f"batches of {feature}",
            partial(lambda c, kinds, seqs, extra: (
                cases(c, kinds=kinds, min_seqs=2 if kinds[0] == "empty" else 1),
                [(base_spec(c, seqs), none)] + [(base_spec(c, e, padding_rows=2), none) for e in extra], n(0.5),
            ), kinds=kinds, seqs=seqs, extra=extra),
        ))
    checks.append(_row(
        "batch/mixed", "mixed batches", "every kind of sequence in one step",
        lambda c: (cases(c, min_seqs=3, max_seqs=max(3, c.profile.max_seqs)),
                   [(base_spec(c, ((0, 4), (1, 33), (3, 9), (12, 0), (10, 17)), seed=5), none)], n(0.5)),
    ))
    checks.append(_row(
        "block_boundaries", "block boundaries", "seq_len at k * block_size - 1, k * block_size, + 1",
        lambda c: (st.tuples(boundary_specs(c), st.just(none)),
                   [(base_spec(c, seqs, block_size=bs), LayerFeatures(sliding_window=w) if w else none)
                    for bs in c.plan.draw_block_sizes
                    for seqs, w in ((((1, bs - 1), (1, bs), (1, 2 * bs - 1)), None),
                                    (((bs, 0), (bs, bs), (3, bs - 3)), None),
                                    (((1, 2 * bs - 1), (bs, bs)), bs))
                    if w is None or "sliding_window" in c.plan.features], n(0.5)),
    ))
    lo, hi = prof.long_context
    checks.append(_row(
        "long_context", "long context (> 1024 keys)", f"one sequence of {lo}..{hi} keys",
        lambda c: (st.tuples(long_specs(c), feature_sets(c, allow=c.plan.features) if c.profile.name == "thorough"
                             else st.just(none)),
                   [(base_spec(c, ((1, 1024),)), none), (base_spec(c, ((1, 1100), (2, 3)), seed=1), none),
                    (base_spec(c, ((4, 1200),), seed=2), none)], c.profile.long_examples),
    ))
    return checks


__all__ = ["attention_case", "base_spec", "cases", "semantic_checks", "specs"]
