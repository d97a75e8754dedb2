"""SPEC section 1: the cache writer stores key/value rows bit-exactly at flat
slot ``slot_mapping[t] = block * block_size + offset`` and skips negative
slots; every other cache element stays untouched."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from conformance.core import CaseFailure, Check, Context
from conformance.harness import describe_exception, first_bit_difference, unexpected
from conformance.runner import property_check

SECTION = "cache"
F_WRITE = "cache writer (bit-exact)"
F_NEG = "cache writer: negative slots skipped"


@dataclass(frozen=True)
class WriteCase:
    """One cache write: ``num_tokens`` tokens into a cache of ``num_blocks``
    blocks; every ``skip_every``-th token (if > 0) gets a negative slot
    (``negative_slot``); slots are otherwise distinct and random."""

    num_tokens: int
    num_kv_heads: int
    head_size: int
    head_size_v: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype
    slot_dtype: torch.dtype = torch.int64
    skip_every: int = 0
    negative_slot: int = -1
    seed: int = 0

    def tensors(self, device):
        g = torch.Generator().manual_seed(self.seed)
        gen = torch.float64 if self.dtype == torch.float64 else torch.float32
        T, Hkv, Dqk, Dv = self.num_tokens, self.num_kv_heads, self.head_size, self.head_size_v
        key = torch.randn(T, Hkv, Dqk, generator=g, dtype=gen).to(self.dtype)
        value = torch.randn(T, Hkv, Dv, generator=g, dtype=gen).to(self.dtype)
        if T:
            key[0, 0, 0] = -0.0  # the sign of zero must survive too
        cache = torch.randn(self.num_blocks, self.block_size, Hkv, Dqk + Dv, generator=g, dtype=gen).to(self.dtype)
        cache[::2, -1] = float("nan")  # untouched slots keep their exact bits, NaN included
        slots = torch.randperm(self.num_blocks * self.block_size, generator=g)[:T].to(torch.int64)
        if self.skip_every > 0:
            slots[:: self.skip_every] = self.negative_slot
        return key.to(device), value.to(device), cache.to(device), slots.to(self.slot_dtype).to(device)


def expected_cache(key, value, cache, slots) -> torch.Tensor:
    """The write, one token at a time (CPU)."""
    out = cache.detach().cpu().clone()
    Dqk = key.shape[-1]
    BS = out.shape[1]
    for t, slot in enumerate(slots.cpu().tolist()[: key.shape[0]]):
        if slot < 0:
            continue
        out[slot // BS, slot % BS, :, :Dqk] = key[t].cpu()
        out[slot // BS, slot % BS, :, Dqk:] = value[t].cpu()
    return out


def write_case(ctx: Context, feature: str, case: WriteCase) -> None:
    key, value, cache, slots = case.tensors(ctx.device)
    want = expected_cache(key, value, cache, slots)
    try:
        impl = ctx.backend.get_impl_cls()(
            num_heads=case.num_kv_heads, head_size=case.head_size, scale=case.head_size ** -0.5,
            num_kv_heads=case.num_kv_heads, head_size_v=case.head_size_v,
        )
        impl.do_kv_cache_update(None, key, value, cache, slots)
    except Exception as e:  # noqa: BLE001
        raise unexpected(feature, e, f"writing {case}") from None
    idx = first_bit_difference(want, cache.cpu())
    if idx is None:
        return
    b, o = idx[0], idx[1]
    slot = b * case.block_size + o
    listed = slots.cpu().tolist()
    if slot in listed:
        t = listed.index(slot)
        why = f"slot {slot} is token {t}'s slot"
        col = idx[3]
        part = f"K column {col}" if col < case.head_size else f"V column {col - case.head_size}"
        why += f" ({part}); it must hold a bit-exact copy"
    else:
        negs = [s for s in listed if s < 0]
        why = (f"slot {slot} is not the slot of any token" +
               (f" (slot_mapping has negative entries {sorted(set(negs))}: those tokens must be skipped)"
                if negs else "") + "; it must stay untouched")
    raise CaseFailure(
        f"[{feature}] kv_cache differs from the expected write at [block {b}, offset {o}, kv head {idx[2]}, "
        f"column {idx[3]}]: got {float(cache.cpu()[idx]):.9g}, expected {float(want[idx]):.9g}; {why}\n"
        f"  case: {case}"
    )


@st.composite
def write_cases(draw, ctx: Context, *, negative: bool) -> tuple[WriteCase]:
    plan = ctx.plan
    dqk, dv = draw(st.sampled_from(plan.draw_pairs))
    bs = draw(st.sampled_from(plan.draw_block_sizes))
    nb = draw(st.integers(1, 6))
    hkv = draw(st.integers(1, ctx.profile.max_kv_heads))
    t = draw(st.integers(1 if negative else 0, min(nb * bs, 40)))
    return (WriteCase(
        num_tokens=t, num_kv_heads=hkv, head_size=dqk, head_size_v=dv, block_size=bs, num_blocks=nb,
        dtype=draw(st.sampled_from(plan.dtypes)), slot_dtype=draw(st.sampled_from((torch.int64, torch.int32))),
        skip_every=draw(st.integers(1, 4)) if negative else 0,
        negative_slot=draw(st.sampled_from((-1, -1, -2, -(nb * bs) - 3))) if negative else -1,
        seed=draw(st.integers(0, 2**31 - 1)),
    ),)


def cache_checks(ctx: Context) -> list[Check]:
    plan = ctx.plan
    if not plan.runnable:
        return []
    dqk, dv = plan.draw_pairs[0]
    bs = plan.draw_block_sizes[0]

    def row(check_id, feature, negative, targeted):
        def rerun(c, case):
            write_case(c, feature, case)

        def run(c):
            return property_check(c, check, strategy=write_cases(c, negative=negative), run_case=rerun,
                                  targeted=targeted, examples=c.profile.examples(0.5))

        check = Check(check_id, SECTION, feature, run=run, rerun=rerun)
        return check

    base = dict(num_kv_heads=2, head_size=dqk, head_size_v=dv, block_size=bs, num_blocks=3)
    targeted_plain = [(WriteCase(num_tokens=2 * bs + 1, dtype=d, slot_dtype=sd, seed=i, **base),)
                      for i, (d, sd) in enumerate((d, sd) for d in plan.dtypes for sd in (torch.int64, torch.int32))]
    targeted_neg = [(WriteCase(num_tokens=bs + 3, dtype=plan.precise_dtype, slot_dtype=sd, skip_every=k,
                               negative_slot=neg, seed=k, **base),)
                    for sd in (torch.int64, torch.int32) for k, neg in ((1, -1), (2, -1), (3, -5))]
    return [
        row("cache_writer", F_WRITE, False, targeted_plain),
        row("cache_writer/negative_slots", F_NEG, True, targeted_neg),
    ]


__all__ = ["WriteCase", "cache_checks", "describe_exception"]
