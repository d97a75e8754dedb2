"""Paged DiffKV attention kernels (SPEC section 2) and their host launcher.

One launch path serves any mix of full prefills, chunked prefills, multi-token
(speculative) decodes, single-token decodes and ``q_len = 0`` sequences.

Grid of :func:`_attention_kernel`: ``(Hkv * num_g_tiles, T // BLOCK_Q + S,
num_splits)``, derived from shapes only (heads vary fastest; query tiles run
last-first so the heaviest causal tiles start first). Sequence ``s`` owns the
query tiles ``[qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q + s + 1)`` --
disjoint ranges that hold at least ``ceil(q_len / BLOCK_Q)`` tiles -- so each
program finds its sequence by a binary search over ``query_start_loc`` and
returns at once if its tile is past the sequence's queries. No metadata value
is read on the host.

Mixed batches (decodes and longer queries, known from the builder's host
copies) run as two launches over the same kind of grid, each serving one
class of sequences by ``q_len``: the decode launch with small row tiles, the
other with prefill tiles. The classes partition the sequences for any
metadata values, so a captured CUDA graph stays correct on replay.

On an sm_90 GPU, prefill-regime launches of the shapes and features it
serves (bf16/fp16, Dqk=192 / Dv=128, 16-128-token pages, causal with or
without sinks) go to the Gluon kernel of :mod:`.prefill_gluon` instead (same
grid rule, same ``q_len`` classes, no gather); :func:`_gluon_serves` decides
from host-side facts only. Decode-regime launches of the same shapes and
features (up to 64 query heads per KV head) with as many (query tile, KV
head) programs as the card's tuned rule gives the Gluon decode
(:data:`launch.GLUON_DECODE_RULES`: at most ``num_sms // 2`` on an H100, up
to ``num_sms`` from 8 on an H200) go to the Gluon decode of
:mod:`.decode_gluon` (a producer warp streams the pages by TMA; the same
partials and reduce as here when split), decided the same way by
:func:`_gluon_decode_plan`; larger decode batches, and the decode half of a
mixed batch, run here.

Rows of a program: ``BLOCK_M = BLOCK_Q x G_TILE``, row ``r`` is query token
``q0 + r // G_TILE`` of the sequence and query head ``kvh * G + g_base +
r % G_TILE`` (GQA packing: every K/V tile is loaded once for all the query
heads of its KV head).

KV tiles hold ``BLOCK_N`` consecutive tokens of the sequence and may span
several cache pages: each token's physical row comes from the block table
(masked on ``j < seq_len`` and on the table width), addresses in int64. Only
the tiles that the causal mask and the sliding window leave visible to some
row of the program are visited.

Scores are kept in log2 units: ``log2(e)`` is folded into the scale (or into
the softcap), ALiBi slopes and sinks, and the softmax uses ``exp2``.

Split-KV (flash-decoding): with ``SPLIT`` the visible KV tiles of a program
are cut into ``num_splits`` contiguous ranges (grid axis 2); each writes its
unnormalised partial output, running max and sum to the workspace
(``[T, H, num_splits, Dv]`` / ``[T, H, num_splits]`` fp32) and
:func:`_reduce_kernel` combines them (with the sinks) into the output. The
order of every sum is fixed: results are bitwise deterministic.

Features are compile-time flags (``USE_SOFTCAP``, ``USE_WINDOW``,
``USE_ALIBI``, ``ALIBI_SQRT``, ``USE_SINKS``): a disabled feature emits no
code. All K/V reads go through :func:`_load_kv_tile`, where an fp8
dequantizing variant (per-tensor K/V scales) will fit.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from diffkv.triton import launch
from diffkv.triton.kernels import gather as _gather
from diffkv.triton.kernels import decode_gluon as _decode_gluon
from diffkv.triton.kernels import prefill_gluon as _prefill_gluon

try:  # host-side tensor descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the paged path only
    _TensorDescriptor = None

LOG2E = 1.4426950408889634

_LAUNCHES: list[str] | None = None
"""What :func:`paged_attention` launched, while :func:`trace_launches` is
active (None: nothing is recorded)."""


@contextlib.contextmanager
def trace_launches():
    """Record which kernels :func:`paged_attention` launches inside the
    block (benchmarks, debugging)::

        with trace_launches() as launched:
            paged_attention(...)
        # launched == ["gluon decode, 16 splits + reduce"]

    Host-side and in launch order; costs one ``is None`` test per launch
    when no trace is active. Not thread-safe (one trace at a time)."""
    global _LAUNCHES
    previous, _LAUNCHES = _LAUNCHES, []
    try:
        yield _LAUNCHES
    finally:
        _LAUNCHES = previous


def _traced(what: str) -> None:
    if _LAUNCHES is not None:
        _LAUNCHES.append(what)


def _splits(n: int) -> str:
    return f"{n} splits + reduce" if n > 1 else "unsplit"


@dataclass
class Workspace:
    """Preallocated split-KV scratch (fp32), flat so that one buffer serves
    any ``(T, num_splits)`` with ``T * num_splits <= rows``.

    Attributes:
        partial_out: ``[rows * H * Dv]`` unnormalised partial outputs.
        partial_max: ``[rows * H]`` running maxima (log2 units).
        partial_sum: ``[rows * H]`` running sums of exponentials.
        kv_rows: ``[capacity, Hkv * (Dqk + Dv)]`` (cache dtype) or None:
            contiguous copy of the prefill sequences' K/V rows, read through
            tensor descriptors (see :mod:`diffkv.triton.kernels.gather`).
        kv_start: ``[seqs]`` int32 or None: each sequence's first row in
            ``kv_rows``, written by the gather kernel and read by the attention
            launch after it.
        kv_deferred: ``(rows, row_width, dtype, seqs)`` of a gather buffer
            not allocated yet (None: nothing deferred). A builder defers it
            where the Gluon prefill kernel, which reads the pages in place,
            may serve every prefill; :meth:`ensure_kv_rows` allocates it the
            first time a prefill goes to the Triton kernel instead (a layer
            with a window, softcap or ALiBi; in a serving engine that is the
            profiling run, so the memory is counted).
        prefill_counter: ``[2]`` int32, zero: the persistent Gluon prefill's
            work counter (every launch leaves it zero again); None: that
            kernel is not used with this workspace.
    """

    partial_out: torch.Tensor
    partial_max: torch.Tensor
    partial_sum: torch.Tensor
    kv_rows: torch.Tensor | None = None
    kv_start: torch.Tensor | None = None
    kv_deferred: tuple | None = None
    prefill_counter: torch.Tensor | None = None

    @classmethod
    def allocate(cls, rows: int, num_heads: int, head_size_v: int, device: torch.device | str, *,
                 kv_rows: int = 0, kv_row_width: int = 0, kv_dtype: torch.dtype | None = None,
                 kv_seqs: int = 0, defer_kv: bool = False) -> Workspace:
        """``rows`` (query token x split) rows of split-KV scratch; with
        ``kv_rows > 0`` also a K/V gather buffer of that many token rows of
        ``kv_row_width`` values of ``kv_dtype``, and the row offsets of up to
        ``kv_seqs`` sequences in it -- allocated now, or with ``defer_kv`` by
        the first :meth:`ensure_kv_rows`."""
        ws = cls(
            partial_out=torch.empty(rows * num_heads * head_size_v, dtype=torch.float32, device=device),
            partial_max=torch.empty(rows * num_heads, dtype=torch.float32, device=device),
            partial_sum=torch.empty(rows * num_heads, dtype=torch.float32, device=device),
            prefill_counter=torch.zeros(2, dtype=torch.int32, device=device),
        )
        if kv_rows > 0:
            ws.kv_deferred = (kv_rows, kv_row_width, kv_dtype, kv_seqs)
            if not defer_kv:
                ws.ensure_kv_rows()
        return ws

    def ensure_kv_rows(self) -> None:
        """Allocate a deferred gather buffer (no-op if none is deferred)."""
        if self.kv_deferred is None:
            return
        rows, width, dtype, seqs = self.kv_deferred
        device = self.partial_out.device
        self.kv_rows = torch.empty(rows, width, dtype=dtype, device=device)
        self.kv_start = torch.empty(seqs, dtype=torch.int32, device=device) if seqs > 0 else None
        self.kv_deferred = None

    def max_splits(self, num_tokens: int, num_heads: int, head_size_v: int) -> int:
        """Most splits this workspace holds for ``num_tokens`` query rows."""
        if num_tokens <= 0:
            return 1
        by_out = self.partial_out.numel() // (num_tokens * num_heads * head_size_v)
        by_vec = min(self.partial_max.numel(), self.partial_sum.numel()) // (num_tokens * num_heads)
        return max(1, min(by_out, by_vec))


# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------


@triton.jit
def _load_kv_tile(cache_ptr, offsets, mask):
    """Read a K or V tile from the packed cache (masked entries read 0).

    The one place K/V enter the kernel: an fp8 cache dequantizes here
    (load, multiply by the per-tensor K or V scale, cast to the compute dtype).
    """
    return tl.load(cache_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _load_kv_tile_unmasked(cache_ptr, offsets):
    """:func:`_load_kv_tile` for interior tiles (every offset valid)."""
    return tl.load(cache_ptr + offsets)


@triton.jit
def _probe_interpreter():
    pass


INTERPRETED = type(_probe_interpreter).__name__ == "InterpretedFunction"
"""True when Triton runs in interpreter mode (TRITON_INTERPRET=1 was set
before triton was imported)."""

_UPCAST_BF16_DOT = tl.constexpr(INTERPRETED)
"""Triton's interpreter computes ``tl.dot`` of bf16 operands wrongly (silently,
Triton 3.6); there, bf16 operands are widened to fp32 first (exact: a bf16
product fits fp32's mantissa). False when compiled: no cost on a GPU."""


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; full-precision products for
    fp32 inputs (no TF32)."""
    if _UPCAST_BF16_DOT:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tanh(x):
    """Overflow-safe tanh: ``sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})``;
    huge or infinite ``x`` give +-1, never NaN."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|) in (0, 1]
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# --------------------------------------------------------------------------
# attention kernel
# --------------------------------------------------------------------------

@triton.jit
def _attend_tile(
    acc, m_i, l_i, tile, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope,
    qk_scale, softcap_log2, window, stride_c0, stride_c1, pages, PRELOADED: tl.constexpr,
    PAGES_PER_TILE: tl.constexpr, ka_desc, kb_desc, v_desc, kv_row0, kv_col0, KV_DESC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr,
    D2: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_ALIBI: tl.constexpr, ALIBI_SQRT: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr,
    FOLD_SCALE: tl.constexpr = False,
):
    """One KV tile of the online softmax.

    ``MASKED=False`` is the interior fast path: the caller guarantees every key
    of the tile is visible to every row (causal and window) and lies inside the
    sequence, so no mask is computed and no load is predicated. ``MASKED=True``
    handles the tiles on the diagonal, the window's lower edge and the
    sequence end.

    ``PRELOADED``: the caller read this tile's block-table entries ahead
    (``pages``: ``[PAGES_PER_TILE]``, the tile's cache pages in order;
    ignored otherwise), so
    the K/V addresses depend on no load inside the KV loop and Triton's
    software pipeliner can keep several tiles in flight (with a block-table
    load in the loop it prefetches one tile only).
    """
    cn = tl.arange(0, BLOCK_N)
    d1 = tl.arange(0, D1)
    dv = tl.arange(0, DV_PAD)
    j = tile * BLOCK_N + cn  # key positions [BLOCK_N]
    if KV_DESC:
        # contiguous K/V rows (a gathered copy), read by tensor descriptors
        j_ok = j < seq_len
        kv_desc_row = kv_row0 + tile * BLOCK_N
        k_a = ka_desc.load([kv_desc_row, kv_col0])  # [BLOCK_N, D1]
        x = _dot(q_a, tl.trans(k_a), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
        if D2 > 0:
            k_b = kb_desc.load([kv_desc_row, kv_col0 + D1])  # [BLOCK_N, D2]
            x = _dot(q_b, tl.trans(k_b), x, IEEE)
    else:
        col = j // BLOCK_SIZE
        if PRELOADED:
            j_ok = (j < seq_len) & (col < num_bt_cols)
            if PAGES_PER_TILE > 1:  # BLOCK_N == PAGES_PER_TILE * BLOCK_SIZE: token cn sits in page cn // BLOCK_SIZE
                block = tl.reshape(tl.broadcast_to(pages[:, None], [PAGES_PER_TILE, BLOCK_SIZE]), [BLOCK_N])
            else:  # the tile lies inside one page
                block = tl.sum(pages, 0)
            block = block.to(tl.int64)
        elif MASKED:
            j_ok = (j < seq_len) & (col < num_bt_cols)
            block = tl.load(bt_row + col, mask=j_ok, other=0).to(tl.int64)
        else:
            j_ok = cn < BLOCK_N
            block = tl.load(bt_row + col).to(tl.int64)
        kv_row = block * stride_c0 + (j % BLOCK_SIZE).to(tl.int64) * stride_c1 + head_off  # [BLOCK_N]
        # scores [BLOCK_M, BLOCK_N]; K tiles read [BLOCK_N, D] (rows contiguous) and transposed
        k_mask = j_ok[:, None]
        if D1 > DQK:
            k_mask = k_mask & (d1[None, :] < DQK)
        if MASKED or D1 > DQK:
            k_a = _load_kv_tile(cache_ptr, kv_row[:, None] + d1[None, :], k_mask)
        else:
            k_a = _load_kv_tile_unmasked(cache_ptr, kv_row[:, None] + d1[None, :])
        x = _dot(q_a, tl.trans(k_a), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
        if D2 > 0:
            d2 = D1 + tl.arange(0, D2)
            k_mask2 = j_ok[:, None]
            if D1 + D2 > DQK:
                k_mask2 = k_mask2 & (d2[None, :] < DQK)
            if MASKED or D1 + D2 > DQK:
                k_b = _load_kv_tile(cache_ptr, kv_row[:, None] + d2[None, :], k_mask2)
            else:
                k_b = _load_kv_tile_unmasked(cache_ptr, kv_row[:, None] + d2[None, :])
            x = _dot(q_b, tl.trans(k_b), x, IEEE)
    if FOLD_SCALE and not MASKED:
        # plain interior tile, qk_scale > 0: the row max of the raw scores
        # times qk_scale is the max of the scaled ones, and the scaling joins
        # the exponent's subtraction in one FMA per score
        m_new = tl.maximum(m_i, tl.max(x, 1) * qk_scale)
        p = tl.exp2(x * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_DESC:
            v = v_desc.load([kv_desc_row, kv_col0 + DQK])
        elif DV_PAD > DV:
            v = _load_kv_tile(cache_ptr, kv_row[:, None] + DQK + dv[None, :], (dv < DV)[None, :])
        else:
            v = _load_kv_tile_unmasked(cache_ptr, kv_row[:, None] + DQK + dv[None, :])
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        return acc, m_new, l_i
    x = x * qk_scale
    if USE_SOFTCAP:
        x = softcap_log2 * _tanh(x)
    if USE_ALIBI:
        if ALIBI_SQRT:
            dist = tl.maximum(pos[:, None] - j[None, :], 0).to(tl.float32)
            x = x - slope[:, None] * tl.sqrt(dist)
        else:
            x = x + slope[:, None] * (j - ctx).to(tl.float32)[None, :]
    if MASKED:
        allowed = (j[None, :] <= pos[:, None]) & j_ok[None, :]
        if USE_WINDOW:
            allowed = allowed & ((pos[:, None] - j[None, :]) < window)
        x = tl.where(allowed, x, float("-inf"))
    # online softmax (log2 units); rows with nothing visible yet stay at 0
    m_new = tl.maximum(m_i, tl.max(x, 1))
    if MASKED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(x - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_DESC:
        v = v_desc.load([kv_desc_row, kv_col0 + DQK])
        if MASKED:  # rows past the sequence hold anything (other sequences, never-written memory)
            v = tl.where(j_ok[:, None], v, 0.0)
    elif MASKED or DV_PAD > DV:
        v = _load_kv_tile(cache_ptr, kv_row[:, None] + DQK + dv[None, :], j_ok[:, None] & (dv[None, :] < DV))
    else:
        v = _load_kv_tile_unmasked(cache_ptr, kv_row[:, None] + DQK + dv[None, :])
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return acc, m_new, l_i



@triton.jit
def _phased_tiles(
    acc, m_i, l_i, tile_begin, int_lo, int_hi, tile_end, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len,
    num_bt_cols, slope, qk_scale, softcap_log2, window, stride_c0, stride_c1, ka_desc, kb_desc, v_desc, kv_row0,
    kv_col0, USE_DESC: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr, ALIBI_SQRT: tl.constexpr,
    IEEE: tl.constexpr, FOLD_SCALE: tl.constexpr,
):
    """The KV tiles of a prefill program in three loops: masked tiles below
    the window's edge, interior tiles (mask-free), masked tiles from the
    diagonal on. ``USE_DESC``: K/V from the gathered copy (descriptors)."""
    for tile in range(tile_begin, int_lo):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, tile, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope,
            qk_scale, softcap_log2, window, stride_c0, stride_c1, tile, False, 1, ka_desc, kb_desc, v_desc, kv_row0, kv_col0, USE_DESC, BLOCK_SIZE, BLOCK_M, BLOCK_N, DQK, D1, D2, DV, DV_PAD,
            USE_SOFTCAP, USE_WINDOW, USE_ALIBI, ALIBI_SQRT, IEEE, True)
    for tile in range(int_lo, int_hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, tile, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope,
            qk_scale, softcap_log2, window, stride_c0, stride_c1, tile, False, 1, ka_desc, kb_desc, v_desc, kv_row0, kv_col0, USE_DESC, BLOCK_SIZE, BLOCK_M, BLOCK_N, DQK, D1, D2, DV, DV_PAD,
            USE_SOFTCAP, USE_WINDOW, USE_ALIBI, ALIBI_SQRT, IEEE, False, FOLD_SCALE)
    for tile in range(int_hi, tile_end):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, tile, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope,
            qk_scale, softcap_log2, window, stride_c0, stride_c1, tile, False, 1, ka_desc, kb_desc, v_desc, kv_row0, kv_col0, USE_DESC, BLOCK_SIZE, BLOCK_M, BLOCK_N, DQK, D1, D2, DV, DV_PAD,
            USE_SOFTCAP, USE_WINDOW, USE_ALIBI, ALIBI_SQRT, IEEE, True)
    return acc, m_i, l_i


@triton.jit
def _attention_kernel(
    q_ptr,  # [T, H, DQK]
    cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, DQK + DV]
    out_ptr,  # [T, H, DV]
    qsl_ptr,  # [S + 1] int32
    seq_lens_ptr,  # [S] int32
    bt_ptr,  # [S, num_bt_cols] int32
    alibi_ptr,  # [H] fp32 (USE_ALIBI)
    sinks_ptr,  # [H] fp32 (USE_SINKS)
    part_out_ptr,  # [T, H, num_splits, DV] fp32 (SPLIT)
    part_max_ptr,  # [T, H, num_splits] fp32 (SPLIT)
    part_sum_ptr,  # [T, H, num_splits] fp32 (SPLIT)
    ka_desc,  # KV_DESC: descriptors over contiguous K/V rows [rows, Hkv * (DQK + DV)]
    kb_desc,
    v_desc,
    kv_start_ptr,  # KV_DESC: [S] int32, first row of each sequence
    kv_capacity,  # KV_DESC: rows of the gathered copy
    num_seqs,
    num_heads,
    num_bt_cols,
    num_splits,
    q_len_lo,  # sequences with q_len outside [q_len_lo, q_len_hi] are left to another launch
    q_len_hi,
    qk_scale,  # scale * log2(e); scale / softcap with USE_SOFTCAP
    softcap_log2,  # softcap * log2(e)
    window,  # sliding window W (keys), USE_WINDOW
    stride_q0,
    stride_q1,
    stride_c0,
    stride_c1,
    stride_c2,
    stride_o0,
    stride_o1,
    stride_bt0,
    BLOCK_SIZE: tl.constexpr,  # cache page size
    G: tl.constexpr,  # query heads per KV head
    G_TILE: tl.constexpr,  # query heads per program (power of two)
    NUM_G_TILES: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    IDX_Q: tl.constexpr,  # query tokens per tile index (>= BLOCK_Q; > only for a launch of short queries)
    BLOCK_M: tl.constexpr,  # BLOCK_Q * G_TILE
    BLOCK_N: tl.constexpr,
    DQK: tl.constexpr,
    D1: tl.constexpr,  # power-of-two chunk of DQK
    D2: tl.constexpr,  # padded remainder chunk (0: none)
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    ALIBI_SQRT: tl.constexpr,
    USE_SINKS: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    PHASED: tl.constexpr,  # mask-free path for interior tiles
    PRELOAD_TILES: tl.constexpr,  # > 0: read the block table ahead in chunks of this many KV tiles (unphased loop)
    PAGES_PER_TILE: tl.constexpr,  # cache pages a KV tile spans (1 when a page holds the tile)
    FOLD_SCALE: tl.constexpr,  # qk_scale > 0, no softcap / ALiBi: interior tiles scale inside the exponent's FMA
    KV_DESC: tl.constexpr,  # K/V from the contiguous gathered copy through tensor descriptors (prefill)
):
    # grid (Hkv * NUM_G_TILES, query tiles, splits): heads vary fastest so the
    # programs sharing K/V run together; query tiles run last-first, so in a
    # causal prefill the tiles with the most keys start first (load balance)
    pid_q = tl.num_programs(1) - 1 - tl.program_id(1)
    kvh = tl.program_id(0) // NUM_G_TILES
    g_base = (tl.program_id(0) % NUM_G_TILES) * G_TILE
    split = tl.program_id(2)

    # -- which sequence owns query tile pid_q: largest s with start(s) <= pid_q
    lo = pid_q * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(qsl_ptr + mid) // IDX_Q + mid
        go_right = start <= pid_q
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    s = lo
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    q0 = (pid_q - (q_start // IDX_Q + s)) * IDX_Q
    if q0 >= q_len:
        return
    if IDX_Q > BLOCK_Q:  # a tile serves rows [q0, q0 + BLOCK_Q) only: longer queries belong to another launch
        if q_len > BLOCK_Q:
            return
    if (q_len < q_len_lo) | (q_len > q_len_hi):  # this launch serves one class of sequences
        return
    seq_len = tl.load(seq_lens_ptr + s)
    ctx = seq_len - q_len  # context_len: keys before the first new token

    # -- rows: BLOCK_Q query tokens x G_TILE heads of KV head kvh
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // G_TILE  # local query index
    g = g_base + r % G_TILE
    h = kvh * G + g  # query head
    row_ok = (qi < q_len) & (g < G)
    pos = ctx + qi  # absolute position of the query
    t_row = (q_start + qi).to(tl.int64)  # global query row

    q_row = q_ptr + t_row * stride_q0 + h.to(tl.int64) * stride_q1
    d1 = tl.arange(0, D1)
    q_a = tl.load(q_row[:, None] + d1[None, :], mask=row_ok[:, None] & (d1[None, :] < DQK), other=0.0)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        q_b = tl.load(q_row[:, None] + d2[None, :], mask=row_ok[:, None] & (d2[None, :] < DQK), other=0.0)
    else:
        q_b = q_a  # unused
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + h, mask=g < G, other=0.0) * 1.4426950408889634

    # -- KV tiles visible to some row of this program
    q_last = tl.minimum(q0 + BLOCK_Q, q_len)  # exclusive
    kv_hi = ctx + q_last  # causal: keys j < kv_hi
    if USE_WINDOW:
        kv_lo = tl.maximum(ctx + q0 - window + 1, 0)  # window: j > p - W
    else:
        kv_lo = 0
    tile_lo = kv_lo // BLOCK_N
    tile_hi = (kv_hi + BLOCK_N - 1) // BLOCK_N
    if SPLIT:
        per_split = (tile_hi - tile_lo + num_splits - 1) // num_splits
        tile_begin = tile_lo + split * per_split
        tile_end = tl.minimum(tile_begin + per_split, tile_hi)
    else:
        tile_begin = tile_lo
        tile_end = tile_hi

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)

    bt_row = bt_ptr + s.to(tl.int64) * stride_bt0
    head_off = kvh.to(tl.int64) * stride_c2
    if KV_DESC:
        kv_row0 = tl.load(kv_start_ptr + s)
    else:
        kv_row0 = 0
    kv_col0 = kvh * (DQK + DV)
    if not USE_ALIBI:
        slope = 0.0
    # interior tiles [int_lo, int_hi): every key visible to every row of the
    # program (keys <= first row's position, and inside the window of the last
    # row) -- no masks there; the edges go through the masked path
    if PHASED:
        int_hi = (ctx + q0 + 1) // BLOCK_N
        if USE_WINDOW:
            int_lo = (tl.maximum(ctx + q_last - window, 0) + BLOCK_N - 1) // BLOCK_N
        else:
            int_lo = tile_begin * 0
        int_lo = tl.minimum(tl.maximum(int_lo, tile_begin), tile_end)
        int_hi = tl.maximum(tl.minimum(int_hi, tile_end), int_lo)
        if KV_DESC:
            if kv_row0 + seq_len <= kv_capacity:  # this sequence's rows are in the gathered copy
                acc, m_i, l_i = _phased_tiles(
                    acc, m_i, l_i, tile_begin, int_lo, int_hi, tile_end, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope, qk_scale, softcap_log2, window, stride_c0, stride_c1, ka_desc, kb_desc, v_desc, kv_row0, kv_col0, True, BLOCK_SIZE, BLOCK_M, BLOCK_N, DQK, D1, D2, DV, DV_PAD, USE_SOFTCAP, USE_WINDOW, USE_ALIBI, ALIBI_SQRT, IEEE, FOLD_SCALE)
            else:  # a batch larger than the copy (e.g. a graph replayed with longer sequences): paged reads
                acc, m_i, l_i = _phased_tiles(
                    acc, m_i, l_i, tile_begin, int_lo, int_hi, tile_end, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope, qk_scale, softcap_log2, window, stride_c0, stride_c1, ka_desc, kb_desc, v_desc, kv_row0, kv_col0, False, BLOCK_SIZE, BLOCK_M, BLOCK_N, DQK, D1, D2, DV, DV_PAD, USE_SOFTCAP, USE_WINDOW, USE_ALIBI, ALIBI_SQRT, IEEE, FOLD_SCALE)
        else:
            acc, m_i, l_i = _phased_tiles(
                acc, m_i, l_i, tile_begin, int_lo, int_hi, tile_end, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope, qk_scale, softcap_log2, window, stride_c0, stride_c1, ka_desc, kb_desc, v_desc, kv_row0, kv_col0, False, BLOCK_SIZE, BLOCK_M, BLOCK_N, DQK, D1, D2, DV, DV_PAD, USE_SOFTCAP, USE_WINDOW, USE_ALIBI, ALIBI_SQRT, IEEE, FOLD_SCALE)
    elif PRELOAD_TILES > 0:
        # the block-table entries of PRELOAD_TILES tiles are read before the
        # inner loop, which then has no dependent load and pipelines deeply
        ct = tl.arange(0, PRELOAD_TILES)
        pp = tl.arange(0, PAGES_PER_TILE)
        for c0 in range(tile_begin, tile_end, PRELOAD_TILES):
            page_col = ((c0 + ct) * BLOCK_N // BLOCK_SIZE)[:, None] + pp[None, :]  # [PRELOAD_TILES, PAGES_PER_TILE]
            page_ok = (page_col < num_bt_cols) & (page_col * BLOCK_SIZE < seq_len)
            chunk_pages = tl.load(bt_row + page_col, mask=page_ok, other=0)
            for tile in range(c0, tl.minimum(c0 + PRELOAD_TILES, tile_end)):
                pages = tl.sum(tl.where((ct == tile - c0)[:, None], chunk_pages, 0), 0)  # [PAGES_PER_TILE]
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, tile, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope,
                    qk_scale, softcap_log2, window, stride_c0, stride_c1, pages, True, PAGES_PER_TILE, ka_desc, kb_desc, v_desc, kv_row0, kv_col0,
                    KV_DESC, BLOCK_SIZE,
                    BLOCK_M, BLOCK_N, DQK, D1, D2, DV, DV_PAD, USE_SOFTCAP, USE_WINDOW, USE_ALIBI, ALIBI_SQRT, IEEE, True)
    else:
        for tile in range(tile_begin, tile_end):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, tile, q_a, q_b, cache_ptr, bt_row, head_off, pos, ctx, seq_len, num_bt_cols, slope,
                qk_scale, softcap_log2, window, stride_c0, stride_c1, tile, False, 1, ka_desc, kb_desc, v_desc, kv_row0, kv_col0, KV_DESC, BLOCK_SIZE, BLOCK_M, BLOCK_N, DQK, D1, D2, DV,
                DV_PAD, USE_SOFTCAP, USE_WINDOW, USE_ALIBI, ALIBI_SQRT, IEEE, True)

    dv = tl.arange(0, DV_PAD)
    dv_ok = dv < DV
    if SPLIT:
        slot = (t_row * num_heads + h) * num_splits + split
        tl.store(part_max_ptr + slot, m_i, mask=row_ok)
        tl.store(part_sum_ptr + slot, l_i, mask=row_ok)
        tl.store(part_out_ptr + slot[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
    else:
        if USE_SINKS:
            z = tl.load(sinks_ptr + h, mask=g < G, other=0.0) * 1.4426950408889634
            m_f = tl.maximum(m_i, z)
            corr = tl.exp2(m_i - m_f)
            l_i = l_i * corr + tl.exp2(z - m_f)
            acc = acc * corr[:, None]
        out = acc / l_i[:, None]
        o_row = out_ptr + t_row * stride_o0 + h.to(tl.int64) * stride_o1
        tl.store(o_row[:, None] + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _reduce_kernel(
    out_ptr,  # [T, H, DV]
    part_out_ptr,  # [T, H, num_splits, DV] fp32
    part_max_ptr,  # [T, H, num_splits] fp32
    part_sum_ptr,  # [T, H, num_splits] fp32
    qsl_ptr,  # [S + 1] int32
    sinks_ptr,  # [H] fp32 (USE_SINKS)
    num_seqs,
    num_heads,
    num_splits,
    stride_o0,
    stride_o1,
    DV: tl.constexpr,
    D_CHUNK: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    """Combine the KV splits of query row ``t``, head ``h``, for one chunk of
    ``D_CHUNK`` value columns (grid ``(T, H, cdiv(Dv, D_CHUNK))``: enough
    programs to hide latency even for a single sequence). The sinks join the
    denominator here. Rows past ``qsl[S]`` are not owned by any sequence and
    are left untouched. The sum over splits has a fixed order."""
    t = tl.program_id(0).to(tl.int64)
    if t >= tl.load(qsl_ptr + num_seqs):
        return
    h = tl.program_id(1)
    base = (t * num_heads + h) * num_splits
    k = tl.arange(0, SPLITS_PAD)
    k_ok = k < num_splits
    m = tl.load(part_max_ptr + base + k, mask=k_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + base + k, mask=k_ok, other=0.0)
    m_all = tl.max(m, 0)
    if USE_SINKS:
        z = tl.load(sinks_ptr + h) * 1.4426950408889634
        m_all = tl.maximum(m_all, z)
    w = tl.exp2(m - m_all)  # empty or missing splits: exp2(-inf) = 0
    denom = tl.sum(l * w, 0)
    if USE_SINKS:
        denom += tl.exp2(z - m_all)
    dv = tl.program_id(2) * D_CHUNK + tl.arange(0, D_CHUNK)
    dv_ok = dv < DV
    part = tl.load(part_out_ptr + (base + k)[:, None] * DV + dv[None, :], mask=k_ok[:, None] & dv_ok[None, :],
                   other=0.0)
    out = tl.sum(part * w[:, None], 0) / denom
    tl.store(out_ptr + t * stride_o0 + h.to(tl.int64) * stride_o1 + dv, out.to(out_ptr.dtype.element_ty), mask=dv_ok)


# --------------------------------------------------------------------------
# host launcher
# --------------------------------------------------------------------------


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    use_alibi_sqrt: bool = False,
    sinks: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    workspace: Workspace | None = None,
    num_splits: int | None = None,
    num_decode_seqs: int | None = None,
    max_decode_query_len: int | None = None,
) -> torch.Tensor:
    """Launch DiffKV paged attention. Inputs are assumed checked
    (:mod:`diffkv.validation`); nothing is read back from the device and
    nothing is allocated, so the call is CUDA-graph capturable.

    Args:
        query: [T, H, Dqk]; kv_cache: [num_blocks, block_size, Hkv, Dqk + Dv]
            (any strides on dims 0-2, last dim contiguous);
            query_start_loc: [S + 1] int32; seq_lens: [S] int32;
            block_table: [>= S, max_blocks] int32; out: [>= T, H, Dv].
        alibi_slopes, sinks: [H] fp32 on the device of query (or None).
        max_query_len, max_seq_len: host upper bounds steering tile sizes and
            the split count (shape-derived bounds when None).
        workspace: split-KV scratch; None = single pass.
        num_splits: force a KV split count (clamped to what the workspace
            holds).
        num_decode_seqs: host count of sequences with ``q_len <=
            DECODE_MAX_QUERY_LEN`` (from the builder's host copies). When a batch
            mixes them with longer queries, each class runs with its own
            tiles (two launches); None = one launch with the prefill tiles.
        max_decode_query_len: host bound of those sequences' ``q_len`` (sizes
            the decode tiles of a mixed batch; default DECODE_MAX_QUERY_LEN).

    Returns:
        out (rows ``t < query_start_loc[S]`` written, the rest untouched).
    """
    T, H, Dqk = query.shape
    block_size, Hkv = kv_cache.shape[1], kv_cache.shape[2]
    Dv = kv_cache.shape[3] - Dqk
    S = seq_lens.shape[0]
    if T == 0 or S == 0:
        return out
    # prefill regime (plan_for's rule, from the same hint): the Gluon kernel or
    # the Triton kernel over a gathered copy; decode-regime calls skip both checks
    prefill = (max_query_len if max_query_len is not None else -(-T // S)) > launch.DECODE_MAX_QUERY_LEN
    gluon = prefill and _gluon_serves(query, kv_cache, out, scale, sliding_window, softcap, alibi_slopes)
    if prefill and not gluon and workspace is not None:
        workspace.ensure_kv_rows()  # prefills go to the Triton kernel: it reads a gathered copy
    if (num_decode_seqs is not None and 0 < num_decode_seqs < S and max_query_len is not None
            and max_query_len > launch.DECODE_MAX_QUERY_LEN):
        # mixed batch: decodes and prefills each get their own tiles (two
        # launches over the same shape-derived grid, each program serving only
        # its class of sequences); the decode launch runs unsplit so that no
        # reduce touches prefill rows
        dec = plan_for(query, kv_cache, seq_lens, block_table,
                       max_query_len=max_decode_query_len or launch.DECODE_MAX_QUERY_LEN,
                       max_seq_len=max_seq_len, workspace=None, sliding_window=sliding_window)
        pre = plan_for(query, kv_cache, seq_lens, block_table, max_query_len=max_query_len, max_seq_len=max_seq_len,
                       workspace=None, sliding_window=sliding_window,
                       gathered=not gluon and _can_gather(query, kv_cache, workspace, S - num_decode_seqs, max_seq_len,
                                                          block_table))
        common = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes,
                      use_alibi_sqrt=use_alibi_sqrt, sinks=sinks)
        # the decode launch indexes tiles as coarsely as the prefill launch (its
        # grid is as small), serving q_len <= dec.block_q; the prefill launch
        # serves the rest -- a partition of the sequences whatever the
        # metadata values are at a CUDA-graph replay
        idx_q = max(pre.block_q, dec.block_q)
        side = _side_stream(query.device)
        if side is not None:
            # the memory-bound decode launch overlaps the compute-bound prefill
            # launch (fork/join on a side stream; capturable in a CUDA graph)
            main = torch.cuda.current_stream(query.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                _launch(query, kv_cache, query_start_loc, seq_lens, block_table, out, dec, None,
                        q_len_range=(0, dec.block_q), idx_q=idx_q, **common)
        else:
            _launch(query, kv_cache, query_start_loc, seq_lens, block_table, out, dec, None,
                    q_len_range=(0, dec.block_q), idx_q=idx_q, **common)
        pre_range = (dec.block_q + 1, 2**31 - 1)
        if gluon:
            _traced("gluon prefill")
            _prefill_gluon.prefill(query, kv_cache, query_start_loc, seq_lens, block_table, out, scale=scale,
                                   sinks=sinks, q_len_range=pre_range)
        else:
            kv_desc = _gather_for(query, kv_cache, query_start_loc, seq_lens, block_table, workspace, pre, pre_range,
                                  max_seq_len)
            _launch(query, kv_cache, query_start_loc, seq_lens, block_table, out, pre, None, q_len_range=pre_range,
                    kv_desc=kv_desc, **common)
        if side is not None:
            main.wait_stream(side)
        return out
    gluon_decode = None if prefill else _gluon_decode_plan(
        query, kv_cache, out, block_table, S, scale=scale, sliding_window=sliding_window, softcap=softcap,
        alibi_slopes=alibi_slopes, max_query_len=max_query_len, max_seq_len=max_seq_len, workspace=workspace,
        num_splits=num_splits)
    if gluon_decode is not None:
        query_tokens, splits = gluon_decode
        _traced(f"gluon decode, {_splits(splits)}")
        _decode_gluon.decode(query, kv_cache, query_start_loc, seq_lens, block_table, out, scale=scale, sinks=sinks,
                             num_splits=splits, query_tokens=query_tokens,
                             partials=(workspace.partial_out, workspace.partial_max, workspace.partial_sum)
                             if splits > 1 else None)
        if splits > 1:
            _reduce(out, workspace, query_start_loc, sinks, S, splits)
        return out
    plan = plan_for(query, kv_cache, seq_lens, block_table, max_query_len=max_query_len, max_seq_len=max_seq_len,
                    workspace=workspace, num_splits=num_splits, sliding_window=sliding_window,
                    gathered=not gluon and _can_gather(query, kv_cache, workspace, S, max_seq_len, block_table))
    if plan.phased and gluon:
        # prefill regime on an H100-class GPU: the Gluon kernel (no gather, no
        # split), persistent where the workspace holds its work counter
        counter = workspace.prefill_counter if workspace is not None else None
        _traced("gluon prefill, persistent" if counter is not None else "gluon prefill")
        return _prefill_gluon.prefill(query, kv_cache, query_start_loc, seq_lens, block_table, out, scale=scale,
                                      sinks=sinks, q_len_range=(0, 2**31 - 1), counter=counter,
                                      num_sms=launch.device_arch(query.device, False)[1])
    kv_desc = _gather_for(query, kv_cache, query_start_loc, seq_lens, block_table, workspace, plan,
                          (0, 2**31 - 1), max_seq_len)
    return _launch(query, kv_cache, query_start_loc, seq_lens, block_table, out, plan, workspace, scale=scale,
                   sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes,
                   use_alibi_sqrt=use_alibi_sqrt, sinks=sinks, q_len_range=(0, 2**31 - 1), kv_desc=kv_desc)


def _can_gather(query: torch.Tensor, kv_cache: torch.Tensor, workspace: Workspace | None, num_seqs: int,
                max_seq_len: int | None, block_table: torch.Tensor) -> bool:
    """The prefill K/V of up to ``num_seqs`` sequences fit the workspace's
    gather buffer and can be read through tensor descriptors: a CUDA device
    with TMA (sm_90+) or the Triton interpreter, 16-bit values, K as a power-of-two chunk plus a
    power-of-two remainder (192 = 128 + 64), V a power of two, 16-byte
    aligned rows. The row bound is ``num_seqs x max_seq_len`` (the block
    table's span when no hint is given); the gather never writes past the
    buffer either way."""
    if workspace is None or workspace.kv_rows is None or _TensorDescriptor is None:
        return False
    buf = workspace.kv_rows
    if buf.device != kv_cache.device or buf.dtype != kv_cache.dtype:
        return False
    if kv_cache.dtype not in (torch.float16, torch.bfloat16) or query.dtype != kv_cache.dtype:
        return False
    if not INTERPRETED and (kv_cache.device.type != "cuda" or launch.device_arch(kv_cache.device, False)[0] != "sm90"):
        return False
    _, block_size, hkv, width = kv_cache.shape
    dqk = query.shape[2]
    dv = width - dqk
    d1, d2 = launch.split_head_dim(dqk)
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    if d1 + d2 != dqk or not pow2(d1) or (d2 and not pow2(d2)) or not pow2(dv) or max(d1, dv) > 256:
        return False
    if buf.dim() != 2 or buf.shape[1] != hkv * width or buf.stride(1) != 1 or (buf.stride(0) * 2) % 16 \
            or (width * 2) % 16 or buf.data_ptr() % 16:
        return False
    bound = max_seq_len if max_seq_len is not None else block_table.shape[1] * block_size
    return num_seqs * bound <= buf.shape[0]


def _gather_for(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                block_table: torch.Tensor, workspace: Workspace | None, plan: launch.LaunchPlan,
                q_len_range: tuple[int, int], max_seq_len: int | None) -> tuple | None:
    """For a gathered plan: copy the served sequences' K/V rows into the
    workspace buffer and return the kernel's descriptor arguments
    ``(K chunk 1, K chunk 2, V, kv_start, capacity)``; None for the paged
    path."""
    if not plan.gathered:
        return None
    buf = workspace.kv_rows
    Dqk = query.shape[2]
    Dv = kv_cache.shape[3] - Dqk
    S = seq_lens.shape[0]
    if workspace.kv_start is not None and workspace.kv_start.numel() >= S:
        kv_start = workspace.kv_start[:S]  # written by the gather
    else:  # a workspace made without room for the offsets (direct kernel calls)
        kv_start = torch.empty(S, dtype=torch.int32, device=seq_lens.device)
    bound = max_seq_len if max_seq_len is not None else block_table.shape[1] * kv_cache.shape[1]
    _traced("gather")
    _gather.gather_kv(kv_cache, buf, query_start_loc, seq_lens, block_table, kv_start, max_seq_len=bound,
                      q_len_range=q_len_range)
    bn = plan.block_n
    ka = _TensorDescriptor.from_tensor(buf, [bn, plan.d1])
    kb = _TensorDescriptor.from_tensor(buf, [bn, plan.d2]) if plan.d2 else ka
    v = ka if Dv == plan.d1 else _TensorDescriptor.from_tensor(buf, [bn, Dv])
    return ka, kb, v, kv_start, buf.shape[0]


_USE_GLUON = True
"""Prefill launches go to the Gluon kernel (:mod:`.prefill_gluon`) when it
serves the call; tests and perf/ scripts switch it off to run the Triton
kernel on the same inputs."""


def _gluon_serves(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, scale: float,
                  sliding_window: int | None, softcap: float | None, alibi_slopes: torch.Tensor | None) -> bool:
    """The Gluon prefill kernel serves this call (host-only checks)."""
    if not _USE_GLUON or INTERPRETED or query.device.type != "cuda":
        return False
    return not _prefill_gluon.unsupported_reasons(query, kv_cache, out, scale=scale, sliding_window=sliding_window,
                                                  softcap=softcap, alibi_slopes=alibi_slopes,
                                                  compute_capability=launch.compute_capability(query.device),
                                                  interpreted=False)


_USE_GLUON_DECODE = True
"""Decode launches go to the Gluon decode kernel (:mod:`.decode_gluon`) when
it serves the call; tests and perf/ scripts switch it off."""


def _gluon_decode_plan(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_table: torch.Tensor,
                       num_seqs: int, *, scale: float, sliding_window: int | None, softcap: float | None,
                       alibi_slopes: torch.Tensor | None, max_query_len: int | None, max_seq_len: int | None,
                       workspace: Workspace | None, num_splits: int | None) -> tuple[int, int] | None:
    """``(query tokens per program, KV splits)`` of a Gluon decode launch for
    this decode-regime call, or None where the Gluon decode does not serve
    it or is not the faster kernel for its size (host-only: shapes, the host
    hints -- the average query length and the block table's span when None
    -- and :func:`launch.plan_gluon_decode`). A forced ``num_splits`` skips
    the size rule, so tests reach the kernel with any batch."""
    if not _USE_GLUON_DECODE or INTERPRETED or query.device.type != "cuda":
        return None
    if _decode_gluon.unsupported_reasons(query, kv_cache, out, scale=scale, sliding_window=sliding_window,
                                         softcap=softcap, alibi_slopes=alibi_slopes,
                                         compute_capability=launch.compute_capability(query.device),
                                         interpreted=False):
        return None
    T, H, Dqk = query.shape
    block_size, Hkv = kv_cache.shape[1], kv_cache.shape[2]
    if max_query_len is None:
        max_query_len = -(-T // num_seqs)
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * block_size
    query_tokens = _decode_gluon.query_tokens_per_tile(H, Hkv, max_query_len)
    programs = Hkv * min(num_seqs * -(-max(1, max_query_len) // query_tokens), T // query_tokens + num_seqs)
    num_sms = launch.device_arch(query.device, False)[1]
    rule = launch.gluon_decode_rule(launch.device_name(query.device))
    if num_splits is None and not launch.gluon_decode_fits(programs, num_sms, rule):
        return None
    tile_keys = _decode_gluon.tile_keys(block_size)
    splits = launch.plan_gluon_decode(
        programs=programs, kv_tiles=-(-max(1, max_seq_len) // tile_keys), tile_keys=tile_keys, num_sms=num_sms,
        max_splits=1 if workspace is None else workspace.max_splits(T, H, kv_cache.shape[3] - Dqk),
        num_splits=num_splits, rule=rule)
    return query_tokens, splits


def gluon_may_serve(device: torch.device, *, head_size: int, head_size_v: int, block_size: int,
                    dtype: torch.dtype) -> bool:
    """The Gluon prefill kernel can serve this layer shape on ``device``
    (a call may still go to the Triton kernel: features, strides, scale)."""
    if not _USE_GLUON or INTERPRETED or device.type != "cuda":
        return False
    return not _prefill_gluon.layer_reasons(head_size=head_size, head_size_v=head_size_v, block_size=block_size,
                                            dtype=dtype, compute_capability=launch.compute_capability(device))


_FOLD_SCALE = True
"""Interior tiles fold the score scale into the exponent's FMA where allowed
(perf/exp11.py switches it off to measure the difference)."""

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


try:
    from triton.runtime.errors import PTXASError as _PTXASError
except ImportError:  # pragma: no cover - older Triton raises something else; no fallback there
    class _PTXASError(Exception):
        pass

_STAGES_SUBSTITUTE: dict[tuple, int] = {}
"""``num_stages`` used instead of the tuned one for kernel variants whose tuned
build made ptxas fail (key: constexprs, warps, tuned stages). Filled at run time
only when ptxas fails, so the normal hot path does one empty-dict check."""


def _fallback_stages(num_stages: int) -> list[int]:
    """Pipeline depths to try when ptxas fails on ``num_stages``: shallower
    first (fewer live buffers), then one deeper."""
    return list(range(num_stages - 1, 0, -1)) + [num_stages + 1]


def _run_attention_kernel(grid, args: tuple, consts: dict, num_warps: int, num_stages: int) -> None:
    """Launch :func:`_attention_kernel`, working around ptxas crashes.

    ptxas 12.8 (Triton 3.6) segfaults on a few constexpr combinations (seen on
    sm_90a: 64-row prefill tiles, 2 stages, ALiBi, 64-token pages). The
    pipeline depth changes neither the grid nor the result, so such a variant
    is rebuilt with another ``num_stages`` (warned once, remembered per
    variant); if every depth fails the first error is raised."""
    def variant() -> tuple:
        return tuple(sorted(consts.items())), num_warps, num_stages

    stages = _STAGES_SUBSTITUTE.get(variant(), num_stages) if _STAGES_SUBSTITUTE else num_stages
    try:
        _attention_kernel[grid](*args, **consts, num_warps=num_warps, num_stages=stages)
        return
    except _PTXASError as first:
        if stages != num_stages:  # the remembered substitute failed too
            raise
        for alt in _fallback_stages(num_stages):
            try:
                _attention_kernel[grid](*args, **consts, num_warps=num_warps, num_stages=alt)
            except _PTXASError:
                continue
            _STAGES_SUBSTITUTE[variant()] = alt
            warnings.warn(
                f"diffkv: ptxas failed to build the attention kernel with num_stages={num_stages} "
                f"(num_warps={num_warps}, BLOCK_M={consts.get('BLOCK_M')}, BLOCK_N={consts.get('BLOCK_N')}, "
                f"BLOCK_SIZE={consts.get('BLOCK_SIZE')}); using num_stages={alt} for this variant",
                RuntimeWarning, stacklevel=3)
            return
        raise first


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A second stream per CUDA device (created on first use, never at
    import) for the decode half of a mixed batch; None off CUDA."""
    if device.type != "cuda" or INTERPRETED:
        return None
    index = launch._cuda_index(device)
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _launch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    out: torch.Tensor,
    plan: launch.LaunchPlan,
    workspace: Workspace | None,
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    alibi_slopes: torch.Tensor | None,
    use_alibi_sqrt: bool,
    sinks: torch.Tensor | None,
    q_len_range: tuple[int, int],
    idx_q: int | None = None,
    kv_desc: tuple | None = None,
) -> torch.Tensor:
    """One attention launch (+ reduce when split) for the sequences whose
    ``q_len`` lies in ``q_len_range``. ``idx_q`` (>= plan.block_q) is the
    number of query tokens per tile index; larger than ``plan.block_q`` only
    when every served query fits one tile (``q_len_range[1] <= plan.block_q``)."""
    idx_q = idx_q or plan.block_q
    assert idx_q == plan.block_q or q_len_range[1] <= plan.block_q, (idx_q, plan.block_q, q_len_range)
    T, H, Dqk = query.shape
    block_size, Hkv = kv_cache.shape[1], kv_cache.shape[2]
    Dv = kv_cache.shape[3] - Dqk
    S = seq_lens.shape[0]
    use_softcap = softcap is not None and softcap > 0
    split = plan.num_splits > 1
    dummy = query  # never dereferenced when its feature flag is off
    part_out = workspace.partial_out if split else dummy
    part_max = workspace.partial_max if split else dummy
    part_sum = workspace.partial_sum if split else dummy
    grid = (Hkv * plan.num_g_tiles, T // idx_q + S, plan.num_splits)
    args = (
        query,
        kv_cache,
        out,
        query_start_loc,
        seq_lens,
        block_table,
        alibi_slopes if alibi_slopes is not None else dummy,
        sinks if sinks is not None else dummy,
        part_out,
        part_max,
        part_sum,
        *(kv_desc if kv_desc is not None else (dummy, dummy, dummy, dummy, 0)),
        S,
        H,
        block_table.shape[1],
        plan.num_splits,
        q_len_range[0],
        q_len_range[1],
        float(scale / softcap if use_softcap else scale * LOG2E),
        float(softcap * LOG2E if use_softcap else 0.0),
        int(sliding_window or 0),
        query.stride(0),
        query.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
    )
    consts = dict(
        BLOCK_SIZE=block_size,
        G=H // Hkv,
        G_TILE=plan.g_tile,
        NUM_G_TILES=plan.num_g_tiles,
        BLOCK_Q=plan.block_q,
        IDX_Q=idx_q,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        DQK=Dqk,
        D1=plan.d1,
        D2=plan.d2,
        DV=Dv,
        DV_PAD=plan.dv_pad,
        USE_SOFTCAP=use_softcap,
        USE_WINDOW=sliding_window is not None,
        USE_ALIBI=alibi_slopes is not None,
        ALIBI_SQRT=bool(use_alibi_sqrt and alibi_slopes is not None),
        USE_SINKS=sinks is not None,
        SPLIT=split,
        IEEE=query.dtype == torch.float32,
        PHASED=plan.phased,
        PRELOAD_TILES=plan.preload_tiles,
        PAGES_PER_TILE=max(1, plan.block_n // block_size),
        FOLD_SCALE=bool(_FOLD_SCALE and scale > 0 and not use_softcap and alibi_slopes is None),
        KV_DESC=kv_desc is not None,
    )
    _traced(f"triton attention {plan.block_m}x{plan.block_n}{' gathered' if kv_desc is not None else ''}, "
            f"{_splits(plan.num_splits)}")
    _run_attention_kernel(grid, args, consts, plan.num_warps, plan.num_stages)
    if split:
        _reduce(out, workspace, query_start_loc, sinks, S, plan.num_splits)
    return out


def _reduce(out: torch.Tensor, workspace: Workspace, query_start_loc: torch.Tensor, sinks: torch.Tensor | None,
            num_seqs: int, num_splits: int) -> None:
    """Combine the workspace's ``num_splits`` partials of every owned row
    into ``out`` ([T, H, Dv]); the sinks join the denominator here."""
    T, H, Dv = out.shape
    d_chunk = min(launch.next_pow2(Dv), 64)
    _reduce_kernel[(T, H, triton.cdiv(Dv, d_chunk))](
        out,
        workspace.partial_out,
        workspace.partial_max,
        workspace.partial_sum,
        query_start_loc,
        sinks if sinks is not None else out,
        num_seqs,
        H,
        num_splits,
        out.stride(0),
        out.stride(1),
        DV=Dv,
        D_CHUNK=d_chunk,
        SPLITS_PAD=launch.next_pow2(num_splits),
        USE_SINKS=sinks is not None,
        num_warps=2,
    )


def plan_for(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    workspace: Workspace | None = None,
    num_splits: int | None = None,
    max_splits: int | None = None,
    sliding_window: int | None = None,
    gathered: bool = False,
) -> launch.LaunchPlan:
    """The launch plan :func:`paged_attention` uses for these arguments, from
    shapes and host ints only (also for tests and benchmarks).

    Missing bounds are derived from shapes: ``max_seq_len`` from the block
    table width, ``max_query_len`` as the average query length (a hint: the
    result is correct for any value). ``max_splits`` overrides the
    workspace's capacity (used by callers that allocate after planning).
    """
    T, H, Dqk = query.shape
    block_size, Hkv = kv_cache.shape[1], kv_cache.shape[2]
    Dv = kv_cache.shape[3] - Dqk
    S = seq_lens.shape[0]
    if max_query_len is None:
        max_query_len = -(-T // max(S, 1))
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * block_size
    arch, num_sms = launch.device_arch(query.device, INTERPRETED)
    return launch.plan_attention(
        block_size=block_size,
        gathered=gathered,
        num_tokens=T,
        num_seqs=S,
        num_heads=H,
        num_kv_heads=Hkv,
        head_size=Dqk,
        head_size_v=Dv,
        dtype=query.dtype,
        max_query_len=int(max_query_len),
        max_seq_len=int(max_seq_len),
        arch=arch,
        num_sms=num_sms,
        max_splits=max_splits if max_splits is not None else (
            1 if workspace is None else workspace.max_splits(T, H, Dv)),
        num_splits=num_splits,
        sliding_window=sliding_window,
    )
