"""Deliberately wrong backends: the conformance suite must catch every one.

:class:`HookedBackend` is the reference algorithm (SPEC section 2) cut into
small overridable steps -- gather, head mapping, scores, softcap, mask,
ALiBi, softmax with sinks, store -- and routed through the class API only
(the functional entry points go through the impl too). Without a planted
bug it passes the whole quick profile (``tests/test_conformance_power.py``
checks that), so each failure below is caused by its one planted change.

Each bug is a realistic kernel mistake; :data:`PLANTED` lists, per bug,
the checks that must fail and a word the failure message must contain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffkv.interface import BackendCapabilities, DiffKVBackend, Feature
from diffkv.reference.attention import gather_sequence_kv
from diffkv.reference.backend import ReferenceBackend, ReferenceImpl


class HookedImpl(ReferenceImpl):
    """The reference computation, one overridable method per step."""

    # -- steps ---------------------------------------------------------------
    def gather(self, kv_cache, block_table_row, seq_len):
        """K [seq_len, Hkv, Dqk], V [seq_len, Hkv, Dv] of one sequence."""
        return gather_sequence_kv(kv_cache, block_table_row, seq_len, self.head_size)

    def kv_head_of(self, num_heads, num_kv_heads):
        """[H] index of the KV head each query head reads."""
        return torch.arange(num_heads) // (num_heads // num_kv_heads)

    def scores(self, q, k):
        """[H, q_len, n_keys] scaled dot products."""
        return self.scale * torch.einsum("qhd,khd->hqk", q, k)

    def softcap(self, x):
        c = self.logits_soft_cap
        return x if c is None else c * torch.tanh(x / c)

    def positions(self, context_len, q_len, seq_len, device):
        """[q_len, 1] absolute positions of the query rows."""
        return context_len + torch.arange(q_len, device=device)[:, None]

    def allowed(self, p, j):
        ok = j <= p
        if self.sliding_window is not None:
            ok &= (p - j) < self.sliding_window
        return ok

    def alibi(self, x, slopes, p, j, context_len):
        a = slopes.to(x.dtype)[:, None, None]
        if self.use_alibi_sqrt:
            return x - a * torch.sqrt((p - j).clamp(min=0).to(x.dtype))
        return x + a * (j - context_len).to(x.dtype)

    def sink_logits(self, sinks, x):
        return sinks.to(x.dtype)

    def combine(self, x, v, sinks):
        """Softmax over keys (sinks join the denominator only) times V: [q_len, H, Dv]."""
        m = x.amax(dim=-1, keepdim=True)
        if sinks is not None:
            z = self.sink_logits(sinks, x)[:, None, None]
            m = torch.maximum(m, z)
        e = torch.exp(x - m)
        denom = e.sum(dim=-1, keepdim=True)
        if sinks is not None:
            denom = denom + torch.exp(z - m)
        return torch.einsum("hqk,khd->qhd", e / denom, v)

    def store(self, output, start, end, o):
        output[start:end] = o.to(output.dtype)

    def after_batch(self, output, num_tokens):
        """Hook after every sequence is done (nothing by default)."""

    def empty_sequence(self, output, start):
        """A q_len = 0 sequence produces nothing."""

    # -- driver ----------------------------------------------------------------
    def _attention(self, query, kv_cache, metadata, output):
        slopes, sinks = self._params_on(query.device)
        n = metadata.num_reqs or metadata.seq_lens.shape[0]
        qsl = metadata.query_start_loc[: n + 1].tolist()
        seq_lens = metadata.seq_lens[:n].tolist()
        H, Hkv = self.num_heads, self.num_kv_heads
        compute = torch.float64 if query.dtype == torch.float64 else torch.float32
        heads = self.kv_head_of(H, Hkv).to(query.device)
        for s in range(n):
            start, end = qsl[s], qsl[s + 1]
            q_len, seq_len = end - start, seq_lens[s]
            context_len = seq_len - q_len
            if q_len == 0:
                self.empty_sequence(output, start)
                continue
            k, v = self.gather(kv_cache, metadata.block_table[s], seq_len)
            k, v = k.to(compute)[:, heads], v.to(compute)[:, heads]
            x = self.softcap(self.scores(query[start:end].to(compute), k))
            p = self.positions(context_len, q_len, seq_len, query.device)
            j = torch.arange(k.shape[0], device=query.device)[None, :]
            if slopes is not None:
                x = self.alibi(x, slopes, p, j, context_len)
            x = x.masked_fill(~self.allowed(p, j), float("-inf"))
            self.store(output, start, end, self.combine(x, v, sinks))
        self.after_batch(output, qsl[-1])


class HookedBackend(ReferenceBackend):
    """Reference capabilities; class API only (no direct reference shortcut)."""

    name = "HOOKED_REFERENCE_DIFFKV"
    impl: type[HookedImpl] = HookedImpl
    paged_attention = classmethod(DiffKVBackend.paged_attention.__func__)
    write_kv_cache = classmethod(DiffKVBackend.write_kv_cache.__func__)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.name = "".join(("_" + ch if ch.isupper() else ch) for ch in cls.__name__).strip("_").upper() + "_DIFFKV"
        cls.impl = type(cls.__name__ + "Impl", (cls.impl,), {"__module__": cls.__module__})
        cls.impl.backend = cls

    @classmethod
    def get_impl_cls(cls):
        return cls.impl


HookedImpl.backend = HookedBackend


def _impl(base=HookedImpl, **methods):
    return type("PlantedImpl", (base,), methods)


# --------------------------------------------------------------------------- planted bugs
class WindowOffByOne(HookedBackend):
    """Sliding window keeps W + 1 keys (``p - j <= W``)."""

    impl = _impl(allowed=lambda self, p, j: (j <= p) & (
        (p - j) <= self.sliding_window if self.sliding_window is not None else True))


class WindowFromSequenceEnd(HookedBackend):
    """Window measured from the last key of the sequence for every query row."""

    def _allowed(self, p, j):
        ok = j <= p
        if self.sliding_window is not None:
            last = p.max()
            ok &= (last - j) < self.sliding_window
        return ok

    impl = _impl(allowed=_allowed)


class AlibiRelativeToQuery(HookedBackend):
    """Linear ALiBi as ``a * (j - p)`` instead of ``a * (j - context_len)``:
    invisible without sinks, wrong with them."""

    def _alibi(self, x, slopes, p, j, context_len):
        a = slopes.to(x.dtype)[:, None, None]
        if self.use_alibi_sqrt:
            return x - a * torch.sqrt((p - j).clamp(min=0).to(x.dtype))
        return x + a * (j - p).to(x.dtype)

    impl = _impl(alibi=_alibi)


class AlibiSqrtLinearDistance(HookedBackend):
    """sqrt-mode ALiBi with the linear distance (forgot the sqrt)."""

    def _alibi(self, x, slopes, p, j, context_len):
        a = slopes.to(x.dtype)[:, None, None]
        if self.use_alibi_sqrt:
            return x - a * (p - j).clamp(min=0).to(x.dtype)
        return x + a * (j - context_len).to(x.dtype)

    impl = _impl(alibi=_alibi)


class SinksScaled(HookedBackend):
    """The sink logit multiplied by the softmax scale like a dot product."""

    impl = _impl(sink_logits=lambda self, sinks, x: sinks.to(x.dtype) * self.scale)


class SinksGivenValue(HookedBackend):
    """The sink treated as an extra key whose value is V of key 0."""

    def _combine(self, x, v, sinks):
        out = HookedImpl.combine(self, x, v, sinks)  # [q_len, H, Dv]
        if sinks is None:
            return out
        z = sinks.to(x.dtype)[:, None, None]
        m = torch.maximum(x.amax(dim=-1, keepdim=True), z)
        w_sink = torch.exp(z - m) / (torch.exp(x - m).sum(-1, keepdim=True) + torch.exp(z - m))  # [H, q_len, 1]
        return out + w_sink.permute(1, 0, 2) * v[0][None, :, :]

    impl = _impl(combine=_combine)


class SoftcapBeforeScale(HookedBackend):
    """Softcap applied to the raw dot product, then scaled."""

    def _scores(self, q, k):
        raw = torch.einsum("qhd,khd->hqk", q, k)
        c = self.logits_soft_cap
        return self.scale * (raw if c is None else c * torch.tanh(raw / c))

    impl = _impl(scores=_scores, softcap=lambda self, x: x)


class SoftcapOverflow(HookedBackend):
    """tanh written as (e^2y - 1) / (e^2y + 1) in fp32: inf / inf = NaN for huge logits."""

    def _softcap(self, x):
        c = self.logits_soft_cap
        if c is None:
            return x
        e = torch.exp(2 * (x / c).float())
        return (c * (e - 1) / (e + 1)).to(x.dtype)

    impl = _impl(softcap=_softcap)


class WrongGqaMapping(HookedBackend):
    """Query head h reads KV head h % Hkv instead of h // (H / Hkv)."""

    impl = _impl(kv_head_of=lambda self, H, Hkv: torch.arange(H) % Hkv)


class PaddingRowsWritten(HookedBackend):
    """A kernel launched over all T rows zero-fills the rows owned by no sequence."""

    impl = _impl(after_batch=lambda self, output, num_tokens: output[num_tokens:].zero_())


class NegativeSlotsNotSkipped(HookedBackend):
    """The cache writer forgets the ``slot < 0`` mask (slot -1 lands in the last block)."""

    def _write(self, key, value, kv_cache, slot_mapping):
        BS = kv_cache.shape[1]
        slots = slot_mapping[: key.shape[0]].long()
        kv_cache[slots // BS, slots % BS, :, : self.head_size] = key
        kv_cache[slots // BS, slots % BS, :, self.head_size:] = value

    impl = _impl(_write_kv_cache=_write)


class WrongErrorType(HookedBackend):
    """Checks the sinks length with ``assert`` (AssertionError instead of ValueError)."""

    def _init(self, num_heads, *args, sinks=None, **kwargs):
        assert sinks is None or sinks.shape[0] == num_heads, "bad sinks"
        HookedImpl.__init__(self, num_heads, *args, sinks=sinks, **kwargs)

    impl = _impl(__init__=_init)


class DvMistakenForDqk(HookedBackend):
    """The V tile is sized with head_size (Dqk) instead of head_size_v: V is
    truncated when Dv > Dqk (and the extra output columns never written)."""

    def _gather(self, kv_cache, row, seq_len):
        k, _ = HookedImpl.gather(self, kv_cache, row, seq_len)
        block_size = kv_cache.shape[1]
        j = torch.arange(seq_len, device=kv_cache.device)
        rows = kv_cache[row.long()[j // block_size], j % block_size]
        return k, rows[..., self.head_size: 2 * self.head_size]

    def _store(self, output, start, end, o):
        output[start:end, :, : o.shape[-1]] = o.to(output.dtype)

    impl = _impl(gather=_gather, store=_store)


class MultiTokenDecodeUnmasked(HookedBackend):
    """The decode path (context > 0, 1 < q_len <= 8) places every query row
    at the last position: no causal mask among the new tokens."""

    def _positions(self, context_len, q_len, seq_len, device):
        if context_len > 0 and 1 < q_len <= 8:
            return torch.full((q_len, 1), seq_len - 1, device=device)
        return HookedImpl.positions(self, context_len, q_len, seq_len, device)

    impl = _impl(positions=_positions)


class LastFullBlockDropped(HookedBackend):
    """The last block is read as a partial block of ``seq_len % block_size``
    keys -- zero when seq_len is a multiple of the block size."""

    def _gather(self, kv_cache, row, seq_len):
        bs = kv_cache.shape[1]
        n = seq_len - bs if seq_len % bs == 0 else seq_len
        return HookedImpl.gather(self, kv_cache, row, n)

    impl = _impl(gather=_gather)


class KeysPast1024Ignored(HookedBackend):
    """A fixed 1024-key tile: keys past 1024 are never read."""

    impl = _impl(gather=lambda self, kv, row, seq_len: HookedImpl.gather(self, kv, row, min(seq_len, 1024)))


class ProfilingRunNotZeroed(HookedBackend):
    """Returns the output untouched when attn_metadata is None."""

    def _forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *a, **kw):
        if attn_metadata is None:
            return output
        return HookedImpl.forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *a, **kw)

    impl = _impl(forward=_forward)


class Nondeterministic(HookedBackend):
    """Split-KV partials reduced in a run-dependent order, modelled as noise
    far below the tolerance: only bitwise reproducibility catches it."""

    def _store(self, output, start, end, o):
        output[start:end] = (o + 1e-6 * torch.randn_like(o)).to(output.dtype)

    impl = _impl(store=_store)


class EmptySequenceWritesRow(HookedBackend):
    """A q_len = 0 sequence's program still writes one (zero) row at its
    query_start_loc -- which belongs to the next sequence (or is padding)."""

    def _empty(self, output, start):
        self._late = getattr(self, "_late", []) + [start]

    def _after(self, output, num_tokens):
        for row in getattr(self, "_late", []):
            if row < output.shape[0]:
                output[row] = 0
        self._late = []

    impl = _impl(empty_sequence=_empty, after_batch=_after)


class CacheWriteNotExact(HookedBackend):
    """The cache writer stores through bfloat16."""

    def _write(self, key, value, kv_cache, slot_mapping):
        ReferenceImpl._write_kv_cache(self, key.to(torch.bfloat16).to(key.dtype),
                                      value.to(torch.bfloat16).to(value.dtype), kv_cache, slot_mapping)

    impl = _impl(_write_kv_cache=_write)


class WritesBeforeValidating(HookedBackend):
    """A fused fast path stores K before the arguments are checked: a
    malformed write raises ValueError but leaves K rows in the cache."""

    def _update(self, layer, key, value, kv_cache, slot_mapping):
        slots = slot_mapping[: key.shape[0]].long()
        keep = slots >= 0
        bs = kv_cache.shape[1]
        if key.dim() == 3 and kv_cache.dim() == 4:
            kv_cache[slots[keep] // bs, slots[keep] % bs, :, : key.shape[-1]] = key[keep].to(kv_cache.dtype)
        HookedImpl.do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping)

    impl = _impl(do_kv_cache_update=_update)


class SinksSilentlyIgnored(HookedBackend):
    """Does not declare sinks, does not report them in validate_configuration,
    and silently computes without them."""

    capabilities = BackendCapabilities(
        dtypes=ReferenceBackend.capabilities.dtypes,
        features=ReferenceBackend.capabilities.features - {Feature.SINKS},
    )

    @classmethod
    def validate_configuration(cls, **kw):
        kw["use_sinks"] = False
        return super().validate_configuration(**kw)

    def _init(self, *args, sinks=None, **kwargs):
        HookedImpl.__init__(self, *args, sinks=None, **kwargs)

    impl = _impl(__init__=_init)


@dataclass(frozen=True)
class Planted:
    backend: type
    checks: tuple[str, ...]  # checks that must fail
    words: tuple[str, ...]  # each must appear in every one of those failure messages


PLANTED: tuple[Planted, ...] = (
    Planted(WindowOffByOne, ("feature/sliding_window",), ("sliding_window",)),
    Planted(WindowFromSequenceEnd, ("feature/sliding_window",), ("sliding_window",)),
    Planted(AlibiRelativeToQuery, ("feature/alibi",), ("alibi", "sinks")),
    Planted(AlibiSqrtLinearDistance, ("feature/alibi_sqrt",), ("alibi_sqrt",)),
    Planted(SinksScaled, ("feature/sinks",), ("sinks",)),
    Planted(SinksGivenValue, ("feature/sinks",), ("sinks",)),
    Planted(SoftcapBeforeScale, ("feature/softcap",), ("softcap",)),
    Planted(SoftcapOverflow, ("feature/softcap",), ("softcap",)),
    Planted(WrongGqaMapping, ("gqa",), ("GQA",)),
    Planted(PaddingRowsWritten, ("output_padding",), ("padding",)),
    Planted(NegativeSlotsNotSkipped, ("cache_writer/negative_slots",), ("negative",)),
    Planted(WrongErrorType, ("malformed/sinks_length",), ("sinks", "AssertionError", "ValueError")),
    Planted(DvMistakenForDqk, ("head_size/32x64",), ("Dv=64",)),
    Planted(MultiTokenDecodeUnmasked, ("batch/multi_token_decode",), ("multi-token decode",)),
    Planted(LastFullBlockDropped, ("block_boundaries",), ("block boundaries",)),
    Planted(KeysPast1024Ignored, ("long_context",), ("1024",)),
    Planted(ProfilingRunNotZeroed, ("profiling_run",), ("profiling",)),
    Planted(Nondeterministic, ("determinism",), ("determinism",)),
    Planted(EmptySequenceWritesRow, ("batch/empty",), ("q_len = 0",)),
    Planted(CacheWriteNotExact, ("cache_writer",), ("cache writer", "bit-exact")),
    Planted(WritesBeforeValidating, ("malformed/write_num_tokens",), ("kv_cache was modified",)),
    Planted(SinksSilentlyIgnored, ("feature/sinks",), ("sinks", "declare")),
)
