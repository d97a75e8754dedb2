"""SPEC section 3: the backend class itself -- name, impl and builder
classes, per-layer cache shape, capabilities as data, and
``validate_configuration`` agreeing with the declared capabilities."""

from __future__ import annotations

import itertools

from conformance.core import CaseFailure, Check, Context, Status
from conformance.harness import describe_exception
from conformance.runner import result

SECTION = "capabilities"
FEATURE = "backend class and declared capabilities"
FIELDS = ("dtypes", "kv_cache_dtypes", "block_size_multiple", "max_block_size", "head_sizes", "head_sizes_v",
          "features", "devices")


def capabilities_case(ctx: Context) -> str:
    b = ctx.backend
    caps = getattr(b, "capabilities", None)
    if caps is None:
        raise CaseFailure(f"[{FEATURE}] {ctx.backend_ref} has no `capabilities` (a diffkv.BackendCapabilities)")
    missing = [f for f in FIELDS if not hasattr(caps, f)]
    if missing:
        raise CaseFailure(f"[{FEATURE}] capabilities lack {missing}; expected the fields of BackendCapabilities")
    try:
        name = b.get_name()
        impl_cls, builder_cls = b.get_impl_cls(), b.get_builder_cls()
    except Exception as e:  # noqa: BLE001
        raise CaseFailure(f"[{FEATURE}] get_name/get_impl_cls/get_builder_cls raised {describe_exception(e)}") from None
    if not isinstance(name, str) or not name:
        raise CaseFailure(f"[{FEATURE}] get_name() returned {name!r}; expected a non-empty string")
    for what, cls in (("get_impl_cls()", impl_cls), ("get_builder_cls()", builder_cls)):
        if not isinstance(cls, type):
            raise CaseFailure(f"[{FEATURE}] {what} returned {cls!r}; expected a class")
    if not ctx.plan.runnable:
        raise CaseFailure(
            f"[{FEATURE}] nothing to test: declared dtypes {list(caps.dtypes)} (tested: "
            f"{[str(d) for d in ctx.plan.dtypes]}), head sizes {list(caps.head_sizes)[:6]}..., head_sizes_v "
            f"{list(caps.head_sizes_v)[:6]}..., block sizes multiple of {caps.block_size_multiple} up to "
            f"{caps.max_block_size}"
        )
    # per-layer cache shape: head_size_v is keyword-only and may differ between layers
    bs = ctx.plan.draw_block_sizes[0]
    for dqk, dv in ctx.plan.head_pairs[:3]:
        try:
            shape = tuple(b.get_kv_cache_shape(3, bs, 2, dqk, "auto", head_size_v=dv))
        except Exception as e:  # noqa: BLE001
            raise CaseFailure(f"[{FEATURE}] get_kv_cache_shape(3, {bs}, 2, {dqk}, 'auto', head_size_v={dv}) raised "
                              f"{describe_exception(e)}") from None
        if shape != (3, bs, 2, dqk + dv):
            raise CaseFailure(f"[{FEATURE}] get_kv_cache_shape(3, {bs}, 2, {dqk}, head_size_v={dv}) = {shape}; "
                              f"expected (3, {bs}, 2, {dqk + dv}) = [num_blocks, block_size, Hkv, Dqk + Dv]")
    # validate_configuration accepts every declared combination (all declared features on)
    f = ctx.plan.features
    checked = 0
    for dt, (dqk, dv), bsz in itertools.product(ctx.plan.dtypes, ctx.plan.head_pairs, ctx.plan.block_sizes):
        config = dict(head_size=dqk, head_size_v=dv, dtype=dt, kv_cache_dtype="auto", block_size=bsz,
                      num_heads=4, num_kv_heads=2 if "gqa" in caps.features else 4,
                      use_alibi="alibi" in f or "alibi_sqrt" in f, use_alibi_sqrt="alibi" not in f and "alibi_sqrt" in f,
                      use_sinks="sinks" in f, sliding_window=128 if "sliding_window" in f else None,
                      logits_soft_cap=30.0 if "softcap" in f else None, device=ctx.device)
        try:
            reasons = b.validate_configuration(**config)
        except Exception as e:  # noqa: BLE001
            raise CaseFailure(f"[{FEATURE}] validate_configuration raised {describe_exception(e)}") from None
        if reasons:
            raise CaseFailure(f"[{FEATURE}] validate_configuration rejects a declared configuration "
                              f"({', '.join(f'{k}={v}' for k, v in config.items())}): {reasons}")
        checked += 1
    return (f"{name}: declares {', '.join(str(d).replace('torch.', '') for d in caps.dtypes)}; features "
            f"{sorted(caps.features)}; validate_configuration accepts all {checked} declared combinations tried")


def capabilities_checks(ctx: Context) -> list[Check]:
    def run(c):
        try:
            msg = capabilities_case(c)
        except CaseFailure as e:
            return result(check, Status.FAIL, str(e), cases=1)
        return result(check, Status.PASS, msg, cases=1)

    check = Check("capabilities", SECTION, FEATURE, run=run)
    return [check]
