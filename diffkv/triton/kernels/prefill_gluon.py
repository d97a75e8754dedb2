"""Hopper (sm_90) causal prefill written in Gluon, Triton's lower-level
dialect (``triton.experimental.gluon``, shipped with Triton >= 3.5).

Why a second prefill kernel: Triton 3.6 waits for every wgmma right after it
is issued, so in the Triton kernel QK -> softmax -> PV run one after another
on each SM (perf/exp21-22; its automatic Hopper warp specialization hangs,
perf/exp20). Here each program holds 128 query rows of one head and runs
three partitions (``gl.warp_specialize``):

* two consumer warpgroups, 64 rows each. Per KV tile t a consumer issues
  QK(t+1) and PV(t), waits for QK(t+1) only, runs the softmax of tile t+1
  while PV(t) is still on the tensor cores, then waits for PV(t) (FA3's
  order: no wgmma stays in flight across the loop's back edge, the one shape
  in which ptxas keeps the wgmma pipeline instead of serializing every
  instruction -- ptxas C7512, perf/NOTES.md exp25); the two warpgroups are
  independent, so one's softmax also overlaps the other's matrix work. At
  the end a consumer writes its output tile into its own Q buffer (no longer
  read) and stores it as 16-byte pieces of whole rows (perf exp30);
* one producer warp that loads Q once and K/V tiles of 128 keys into a
  2-deep shared-memory ring by TMA, straight from the paged cache: one TMA
  box per cache page (``block_size`` rows), page ids read from the block
  table. A K (V) slot is refilled when both consumers have finished QK (PV)
  on it (mbarriers with count 2).

Pages past the block table's width or past the sequence are loaded from a
row past the cache's end, which TMA fills with zeros; rows past the sequence
inside its last page (whatever they hold, NaN included) are masked out of the
scores, and consumer 0 zeroes them in the V tile before either consumer's PV
reads it (consumer 1 waits for that), so 0 * NaN never reaches the output.

Two grids of the same partitions: one program per (query tile, head)
(:func:`_prefill_kernel`), and a persistent one (:func:`_persistent_kernel`,
``num_sms`` programs taking work items from a counter; the next item's Q and
first K/V load while the current one finishes: prefill 4x2k 4 % faster,
perf exp35e), used where the caller passes a counter and runs nothing beside
the launch (it keeps every SM until it ends).

Served: bf16/fp16, Dqk = 128 + 64, Dv = 128 (the measured DiffKV shape),
page-contiguous caches with 16..128-token pages, causal attention with
optional sinks. Softcap, ALiBi and sliding windows go to the Triton kernel
(:func:`unsupported_reasons` lists why a call is not served).
"""

from __future__ import annotations

import torch

try:  # Gluon is experimental: a Triton without it keeps the Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDescriptor

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False

BLOCK_M = 128
"""Query rows per program (two consumer warpgroups of 64)."""
BLOCK_N = 128
"""Keys per KV tile (exp22: 128-key tiles 1.30 ms vs 64-key 1.49 ms at 1x8k)."""
NUM_BUF = 2
"""Depth of the K/V ring (2 x 80 KB + 48 KB of Q fit the 227 KB of an SM)."""
CONSUMER_REGS = 240
PRODUCER_REGS = 40
"""The producer warp's registers: 40 keeps it spill-free (24 spilled ~40 B)."""
PERSISTENT_PRODUCER_REGS = 32
"""The persistent kernel's producer: 32 leaves the first consumer (the
default partition, which gets what the others leave) 232 registers, spill-
free in its loop; the producer then spills ~20 B of launch arguments, read
once per program."""
SERVED_SHAPES = {(192, 128): (128, 64)}
"""(Dqk, Dv) -> (D1, D2): the K/Q width in two power-of-two chunks."""
SERVED_BLOCK_SIZES = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


def layer_reasons(*, head_size: int, head_size_v: int, block_size: int, dtype: torch.dtype,
                  compute_capability: int | None, interpreted: bool = False) -> list[str]:
    """Reasons this kernel cannot serve any prefill of a layer shape on a
    device (``compute_capability`` as 90 for sm_90; None: not a CUDA device),
    before looking at a call's tensors or features -- what a metadata builder
    knows when it sizes its buffers."""
    reasons = []
    if not AVAILABLE:
        reasons.append("triton.experimental.gluon is not available in this Triton")
    if interpreted:
        reasons.append("the Triton interpreter does not run Gluon kernels")
    if compute_capability != 90:
        reasons.append(f"needs an sm_90 CUDA device (compute capability {compute_capability}); "
                       "its wgmma/TMA code does not run on other architectures")
    if dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"needs a bf16/fp16 cache (got {dtype})")
    if (head_size, head_size_v) not in SERVED_SHAPES:
        reasons.append(f"head sizes (Dqk={head_size}, Dv={head_size_v}) not in {sorted(SERVED_SHAPES)}")
    if block_size not in SERVED_BLOCK_SIZES:
        reasons.append(f"block_size={block_size} not in {SERVED_BLOCK_SIZES}")
    return reasons


def unsupported_reasons(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, *, scale: float,
                        sliding_window, softcap, alibi_slopes, compute_capability: int | None,
                        interpreted: bool) -> list[str]:
    """Every reason this kernel cannot serve the call (empty: it can).
    Host-only: shapes, strides, dtypes and flags; no device read.
    ``compute_capability``: of the tensors' CUDA device (90 for sm_90), None
    for other devices."""
    T, H, Dqk = query.shape
    num_blocks, block_size, Hkv, width = kv_cache.shape
    Dv = width - Dqk
    reasons = layer_reasons(head_size=Dqk, head_size_v=Dv, block_size=block_size, dtype=query.dtype,
                            compute_capability=compute_capability if query.device.type == "cuda" else None,
                            interpreted=interpreted)
    if kv_cache.dtype != query.dtype or out.dtype != query.dtype:
        reasons.append(f"needs query, cache and output of one dtype (got {query.dtype}, {kv_cache.dtype}, "
                       f"{out.dtype})")
    if softcap is not None and softcap > 0:
        reasons.append("softcap")
    if alibi_slopes is not None:
        reasons.append("ALiBi")
    if sliding_window is not None:
        reasons.append("sliding window")
    if not scale > 0:
        reasons.append(f"scale={scale} (needs > 0: the row max is taken before scaling)")
    if kv_cache.stride() != (block_size * Hkv * width, Hkv * width, width, 1) or kv_cache.data_ptr() % 16:
        reasons.append("needs a contiguous, 16-byte aligned cache (pages of consecutive rows for TMA boxes)")
    if num_blocks * block_size >= 2**31 - BLOCK_N:
        reasons.append("cache rows must fit TMA's int32 coordinates")
    if query.stride(2) != 1 or query.stride(1) != Dqk or (query.stride(0) * query.element_size()) % 16 \
            or query.data_ptr() % 16:
        reasons.append("needs query rows [H * Dqk] contiguous with a 16-byte aligned row stride")
    return reasons


if AVAILABLE:

    @gluon.jit
    def tile_owner(qsl_ptr, num_seqs, pid_q, ROWS: gl.constexpr):
        """The sequence owning query tile ``pid_q`` when sequence ``s``'s
        tiles of ``ROWS`` query tokens start at index ``qsl[s] // ROWS + s``:
        the largest such ``s`` with start <= pid_q (binary search)."""
        lo = pid_q * 0
        hi = lo + num_seqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            start = gl.load(qsl_ptr + mid) // ROWS + mid
            go_right = start <= pid_q
            lo = gl.where(go_right, mid, lo)
            hi = gl.where(go_right, hi, mid - 1)
        return lo

    @gluon.jit
    def load_kv_tile(ka_desc, kb_desc, v_desc, ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty, slot, phase, rows,
                     pi, kv_col0, D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_SIZE: gl.constexpr):
        """One K/V tile into ring slot ``slot`` by TMA, one box per cache page:
        K once the slot's K is free, then V once the slot's V is free
        (``phase``: the parity the empty barriers wait for; ``rows``: the
        pages' first cache rows, lane ``i`` of ``pi`` holding page ``i``)."""
        PAGES: gl.constexpr = BLOCK_N // BLOCK_SIZE
        mbarrier.wait(k_empty.index(slot), phase)
        mbarrier.expect(k_ready.index(slot), BLOCK_N * (D1 + D2) * 2)
        for i in gl.static_range(PAGES):
            row = gl.sum(gl.where(pi == i, rows, 0), 0)
            tma.async_copy_global_to_shared(ka_desc, [row, kv_col0], k_ready.index(slot),
                                            ka_s.index(slot).slice(i * BLOCK_SIZE, BLOCK_SIZE))
            tma.async_copy_global_to_shared(kb_desc, [row, kv_col0 + D1], k_ready.index(slot),
                                            kb_s.index(slot).slice(i * BLOCK_SIZE, BLOCK_SIZE))
        mbarrier.wait(v_empty.index(slot), phase)
        mbarrier.expect(v_ready.index(slot), BLOCK_N * DV * 2)
        for i in gl.static_range(PAGES):
            row = gl.sum(gl.where(pi == i, rows, 0), 0)
            tma.async_copy_global_to_shared(v_desc, [row, kv_col0 + D1 + D2], v_ready.index(slot),
                                            v_s.index(slot).slice(i * BLOCK_SIZE, BLOCK_SIZE))

    @gluon.jit
    def _consumer(c: gl.constexpr, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready, k_empty, v_empty, v_fixed,
                  out_ptr, q_start, q0, q_len, seq_len, ctx, n_tiles, qk_scale, sink_log2, h, stride_o0, stride_o1,
                  HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr, NUM_BUF: gl.constexpr,
                  USE_SINKS: gl.constexpr):
        """Rows [q0 + c * HALF_M, + HALF_M) of the program's query tile."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DV, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        v_reg_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)

        r0 = q0 + c * HALF_M
        int_hi = (ctx + r0 + 1) // BLOCK_N  # tiles below this one are visible to every row: no mask
        last_partial = seq_len < n_tiles * BLOCK_N  # the last tile holds rows past the sequence
        qa = qa_s.index(c)
        qb = qb_s.index(c)
        zero_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
        pos = ctx + r0 + gl.arange(0, HALF_M, layout=s_rows)
        cn = gl.arange(0, BLOCK_N, layout=s_cols)

        # tile 0: S = QK(0), softmax -> P(0)
        mbarrier.wait(q_bars.index(c), 0)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(qa, ka_s.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(qb, kb_s.index(0).permute((1, 0)), s_tok, is_async=True)
        x = warpgroup_mma_wait(0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(0))
        if 0 >= int_hi:
            visible = (cn[None, :] <= pos[:, None]) & (cn < seq_len)[None, :]
            x = gl.where(visible, x, float("-inf"))
        # causal from key 0: every row sees key 0, so m is finite from tile 0 on
        m_i = gl.max(x, 1) * qk_scale
        p = gl.exp2(x * qk_scale - m_i[:, None])
        l_i = gl.sum(p, 1)
        p_op = gl.convert_layout(p.to(v_s.dtype), p_layout)
        acc = gl.zeros([HALF_M, DV], gl.float32, o_layout)
        # steady state, as FA3 orders it: issue QK(t+1) and PV(t), wait for
        # QK(t+1) only, softmax(t+1) while PV(t) runs, then wait for PV(t).
        # No wgmma is in flight across the loop's back edge: ptxas keeps the
        # wgmma pipeline only then (else it serializes every wgmma, C7512).
        for t in range(0, n_tiles - 1):
            slot = t % NUM_BUF
            nslot = (t + 1) % NUM_BUF
            mbarrier.wait(k_ready.index(nslot), ((t + 1) // NUM_BUF) & 1)
            s_tok = warpgroup_mma(qa, ka_s.index(nslot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s_tok = warpgroup_mma(qb, kb_s.index(nslot).permute((1, 0)), s_tok, is_async=True)
            mbarrier.wait(v_ready.index(slot), (t // NUM_BUF) & 1)
            acc_tok = warpgroup_mma(p_op, v_s.index(slot), acc, is_async=True)
            x = warpgroup_mma_wait(1, deps=[s_tok])  # QK(t+1) done; PV(t) may still run
            mbarrier.arrive(k_empty.index(nslot))
            if t + 1 >= int_hi:
                j = (t + 1) * BLOCK_N + cn
                visible = (j[None, :] <= pos[:, None]) & (j < seq_len)[None, :]
                x = gl.where(visible, x, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(x, 1) * qk_scale)
            p = gl.exp2(x * qk_scale - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = warpgroup_mma_wait(0, deps=[acc_tok])  # PV(t) done
            mbarrier.arrive(v_empty.index(slot))
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            p_op = gl.convert_layout(p.to(v_s.dtype), p_layout)
        # last tile: PV(n_tiles - 1)
        t = n_tiles - 1
        slot = t % NUM_BUF
        mbarrier.wait(v_ready.index(slot), (t // NUM_BUF) & 1)
        v_tile = v_s.index(slot)
        if last_partial:
            # rows past the sequence may hold NaN: zero them before PV reads them
            if c == 0:
                for i in gl.static_range(BLOCK_N // 32):  # 32 rows at a time: few registers
                    rows = t * BLOCK_N + i * 32 + gl.arange(0, 32, layout=gl.SliceLayout(1, v_reg_layout))
                    chunk = v_tile.slice(i * 32, 32)
                    v_vals = chunk.load(v_reg_layout)
                    chunk.store(gl.where((rows < seq_len)[:, None], v_vals, gl.zeros_like(v_vals)))
                fence_async_shared()
                mbarrier.arrive(v_fixed)
            else:
                mbarrier.wait(v_fixed, 0)
        acc_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc_tok])

        if USE_SINKS:
            m_f = gl.maximum(m_i, sink_log2)
            corr = gl.exp2(m_i - m_f)
            l_i = l_i * corr + gl.exp2(sink_log2 - m_f)
            acc = acc * gl.convert_layout(corr, o_rows)[:, None]
        out = acc * gl.convert_layout(1.0 / l_i, o_rows)[:, None]  # one division per row, not per element
        # coalesced store: the tile goes through this consumer's Q buffer (no
        # longer read: D1 == DV), then out as 16-byte pieces of whole rows
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        gl.static_assert(qa.shape[1] == DV)
        qa.store(out.to(out_ptr.dtype.element_ty))
        out_c = qa.load(out_layout)
        r = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, out_layout))
        dv = gl.arange(0, DV, layout=gl.SliceLayout(0, out_layout))
        t_row = (q_start + r0 + r).to(gl.int64)
        offs = t_row[:, None] * stride_o0 + h.to(gl.int64) * stride_o1 + dv[None, :]
        gl.store(out_ptr + offs, out_c, mask=(r0 + r < q_len)[:, None] & (dv < DV)[None, :])

    @gluon.jit
    def _producer(qa_desc, qb_desc, ka_desc, kb_desc, v_desc, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready,
                  k_empty, v_empty, bt_row, num_bt_cols, oob_row, q_row, q_col, kv_col0, seq_len, n_tiles,
                  HALF_M: gl.constexpr, D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr,
                  BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, NUM_BUF: gl.constexpr):
        """Q once, then each K/V tile as BLOCK_N // BLOCK_SIZE page boxes. The
        page ids of a tile are read in one vector load, the next tile's while
        the current one's boxes are in flight (perf exp33: read one at a time,
        before each box, they kept tile 0 ~1.8 us from its program's start)."""
        PAGES: gl.constexpr = BLOCK_N // BLOCK_SIZE
        id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        pi = gl.arange(0, PAGES, layout=id_layout)
        ok = (pi < num_bt_cols) & (pi * BLOCK_SIZE < seq_len)
        rows = gl.where(ok, gl.load(bt_row + pi, mask=ok, other=0) * BLOCK_SIZE, oob_row)
        for c in gl.static_range(2):
            mbarrier.expect(q_bars.index(c), HALF_M * (D1 + D2) * 2)
            tma.async_copy_global_to_shared(qa_desc, [q_row + c * HALF_M, q_col], q_bars.index(c), qa_s.index(c))
            tma.async_copy_global_to_shared(qb_desc, [q_row + c * HALF_M, q_col + D1], q_bars.index(c),
                                            qb_s.index(c))
        for t in range(0, n_tiles):
            slot = t % NUM_BUF
            phase = ((t // NUM_BUF) & 1) ^ 1  # a fresh barrier passes a wait for parity 1
            cur = rows
            # pages past the block table's width or the sequence: a row past
            # the cache's end, which TMA fills with zeros
            col = (t + 1) * PAGES + pi
            ok = (col < num_bt_cols) & (col * BLOCK_SIZE < seq_len) & (t + 1 < n_tiles)
            rows = gl.where(ok, gl.load(bt_row + col, mask=ok, other=0) * BLOCK_SIZE, oob_row)
            load_kv_tile(ka_desc, kb_desc, v_desc, ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty, slot, phase,
                         cur, pi, kv_col0, D1, D2, DV, BLOCK_N, BLOCK_SIZE)

    @gluon.jit
    def _prefill_kernel(
        qa_desc, qb_desc,  # query as [T, H * DQK]: boxes [BLOCK_M // 2, D1], [BLOCK_M // 2, D2]
        ka_desc, kb_desc, v_desc,  # cache as [num_blocks * BLOCK_SIZE, Hkv * (DQK + DV)]: page boxes
        out_ptr,  # [T, H, DV]
        qsl_ptr,  # [S + 1] int32
        seq_lens_ptr,  # [S] int32
        bt_ptr,  # [S, num_bt_cols] int32
        sinks_ptr,  # [H] fp32 (USE_SINKS)
        num_seqs, num_bt_cols, stride_bt0, oob_row, q_len_lo, q_len_hi, qk_scale, stride_o0, stride_o1,
        G: gl.constexpr, DQK: gl.constexpr, D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, NUM_BUF: gl.constexpr,
        USE_SINKS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ):
        HALF_M: gl.constexpr = BLOCK_M // 2
        # grid (H, T // BLOCK_M + S): query tiles run last-first, so the tiles
        # with the most keys start first; tile index -> sequence by binary search
        pid_q = gl.num_programs(1) - 1 - gl.program_id(1)
        h = gl.program_id(0)
        kvh = h // G
        s = tile_owner(qsl_ptr, num_seqs, pid_q, BLOCK_M)
        q_start = gl.load(qsl_ptr + s)
        q_len = gl.load(qsl_ptr + s + 1) - q_start
        q0 = (pid_q - (q_start // BLOCK_M + s)) * BLOCK_M
        if (q0 < q_len) & (q_len >= q_len_lo) & (q_len <= q_len_hi):
            seq_len = gl.load(seq_lens_ptr + s)
            ctx = seq_len - q_len
            n_tiles = (ctx + gl.minimum(q0 + BLOCK_M, q_len) + BLOCK_N - 1) // BLOCK_N
            if USE_SINKS:
                sink_log2 = gl.load(sinks_ptr + h) * 1.4426950408889634
            else:
                sink_log2 = qk_scale * 0.0

            qa_s = gl.allocate_shared_memory(qa_desc.dtype, [2, HALF_M, D1], qa_desc.layout)
            qb_s = gl.allocate_shared_memory(qb_desc.dtype, [2, HALF_M, D2], qb_desc.layout)
            ka_s = gl.allocate_shared_memory(ka_desc.dtype, [NUM_BUF, BLOCK_N, D1], ka_desc.layout)
            kb_s = gl.allocate_shared_memory(kb_desc.dtype, [NUM_BUF, BLOCK_N, D2], kb_desc.layout)
            v_s = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, BLOCK_N, DV], v_desc.layout)
            q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            v_fixed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2):
                mbarrier.init(q_bars.index(i), count=1)
            for i in gl.static_range(NUM_BUF):
                mbarrier.init(k_ready.index(i), count=1)
                mbarrier.init(v_ready.index(i), count=1)
                mbarrier.init(k_empty.index(i), count=2)
                mbarrier.init(v_empty.index(i), count=2)
            mbarrier.init(v_fixed, count=1)

            bt_row = bt_ptr + s.to(gl.int64) * stride_bt0
            kv_col0 = kvh * (DQK + DV)
            gl.warp_specialize([
                (_consumer, (0, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready, k_empty, v_empty, v_fixed,
                             out_ptr, q_start, q0, q_len, seq_len, ctx, n_tiles, qk_scale, sink_log2, h, stride_o0,
                             stride_o1, HALF_M, BLOCK_N, DV, NUM_BUF, USE_SINKS)),
                (_consumer, (1, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready, k_empty, v_empty, v_fixed,
                             out_ptr, q_start, q0, q_len, seq_len, ctx, n_tiles, qk_scale, sink_log2, h, stride_o0,
                             stride_o1, HALF_M, BLOCK_N, DV, NUM_BUF, USE_SINKS)),
                (_producer, (qa_desc, qb_desc, ka_desc, kb_desc, v_desc, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready,
                             v_ready, k_empty, v_empty, bt_row, num_bt_cols, oob_row, q_start + q0, h * DQK, kv_col0,
                             seq_len, n_tiles, HALF_M, D1, D2, DV, BLOCK_N, BLOCK_SIZE, NUM_BUF)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


    @gluon.jit
    def _field(info, idx, i: gl.constexpr):
        """Element ``i`` of a work item's record (every field is >= 0; max
        is exact however the layout replicates the record over threads)."""
        v = gl.max(gl.where(idx == i, info, -1), axis=0)
        # redux.sync writes a uniform register: ptxas then knows every lane
        # holds the same value, so loops bounded by it stay uniform control
        # flow and wgmma descriptors stay in uniform registers (else it moves
        # every descriptor with R2UR each iteration: +100 instructions/tile)
        return gl.inline_asm_elementwise("redux.sync.max.u32 $0, $1, 0xffffffff;", "=r,r", [v], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _fix_v_tail(c: gl.constexpr, v_tile, v_fixed, slot, fix_phases, seq_len, key0,
                    BLOCK_N: gl.constexpr, DV: gl.constexpr):
        """Rows of the sequence's last V tile past ``seq_len`` may hold NaN:
        consumer 0 zeroes them before either consumer's PV reads the tile;
        consumer 1 waits for that (one barrier per ring slot: a slot is only
        refilled after both consumers' PV on it, so phases cannot run ahead).
        Returns the flipped phase bits."""
        v_reg_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        if c == 0:
            for i in gl.static_range(BLOCK_N // 32):  # 32 rows at a time: few registers
                rows = key0 + i * 32 + gl.arange(0, 32, layout=gl.SliceLayout(1, v_reg_layout))
                chunk = v_tile.slice(i * 32, 32)
                v_vals = chunk.load(v_reg_layout)
                chunk.store(gl.where((rows < seq_len)[:, None], v_vals, gl.zeros_like(v_vals)))
            fence_async_shared()
            mbarrier.arrive(v_fixed.index(slot))
        else:
            mbarrier.wait(v_fixed.index(slot), (fix_phases >> slot) & 1)
        return fix_phases ^ (1 << slot)

    @gluon.jit
    def _p_consumer(c: gl.constexpr, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready, info_empty, q_ready, q_empty,
                  k_ready, v_ready, k_empty, v_empty, v_fixed, out_ptr, sinks_ptr, qk_scale, stride_o0, stride_o1,
                  HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr, NUM_BUF: gl.constexpr,
                  INFO: gl.constexpr, USE_SINKS: gl.constexpr):
        """Rows [q0 + c * HALF_M, + HALF_M) of each work item the producer
        publishes, until the end record (n_tiles == 0)."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DV, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        info_layout: gl.constexpr = gl.BlockedLayout([INFO], [32], [4], [0])  # every thread: the whole record
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)

        qa = qa_s.index(c)
        qb = qb_s.index(c)
        zero_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
        cn = gl.arange(0, BLOCK_N, layout=s_cols)
        idx = gl.arange(0, INFO, layout=info_layout)
        g = 0  # KV tiles consumed before this item: position in the K/V ring
        k = 0  # items done: slot and phase of the item records and Q
        fix_phases = 0  # per ring slot: parity of its next v_fixed phase
        mbarrier.wait(info_ready.index(0), 0)
        info = info_s.index(0).load(info_layout)
        n_tiles = _field(info, idx, 0)
        while n_tiles > 0:
            q_row = _field(info, idx, 1)  # token row of the item's first query
            q0 = _field(info, idx, 2)
            q_len = _field(info, idx, 3)
            seq_len = _field(info, idx, 4)
            h = _field(info, idx, 5)
            mbarrier.arrive(info_empty.index(k % 2))
            ctx = seq_len - q_len
            r0 = q0 + c * HALF_M
            int_hi = (ctx + r0 + 1) // BLOCK_N  # tiles below this one are visible to every row: no mask
            last_partial = seq_len < n_tiles * BLOCK_N  # the last tile holds rows past the sequence
            if USE_SINKS:
                sink_log2 = gl.load(sinks_ptr + h) * 1.4426950408889634
            pos = ctx + r0 + gl.arange(0, HALF_M, layout=s_rows)

            # tile 0: S = QK(0), softmax -> P(0)
            slot0 = g % NUM_BUF
            mbarrier.wait(k_ready.index(slot0), (g // NUM_BUF) & 1)
            # Q comes in two chunks with a barrier each (the second chunk's
            # QK first)
            mbarrier.wait(q_ready.index(2 + c), k & 1)
            s_tok = warpgroup_mma(qb, kb_s.index(slot0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(q_ready.index(c), k & 1)
            s_tok = warpgroup_mma(qa, ka_s.index(slot0).permute((1, 0)), s_tok, is_async=True)
            x = warpgroup_mma_wait(0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(slot0))
            if 0 >= int_hi:
                visible = (cn[None, :] <= pos[:, None]) & (cn < seq_len)[None, :]
                x = gl.where(visible, x, float("-inf"))
            # causal from key 0: every row sees key 0, so m is finite from tile 0 on
            m_i = gl.max(x, 1) * qk_scale
            p = gl.exp2(x * qk_scale - m_i[:, None])
            l_i = gl.sum(p, 1)
            p_op = gl.convert_layout(p.to(v_s.dtype), p_layout)
            acc = gl.zeros([HALF_M, DV], gl.float32, o_layout)
            # steady state in FA3's order: issue QK(t+1) and PV(t), wait for
            # QK(t+1) only, softmax(t+1) while PV(t) runs, wait for PV(t); no
            # wgmma in flight across a back edge (else ptxas serializes them)
            int_hi_g = int_hi + g  # the loop counts tiles over the program's items: ring slot and phase
            for gt in range(g, g + n_tiles - 1):
                slot = gt % NUM_BUF
                nslot = (gt + 1) % NUM_BUF
                mbarrier.wait(k_ready.index(nslot), ((gt + 1) // NUM_BUF) & 1)
                s_tok = warpgroup_mma(qa, ka_s.index(nslot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                s_tok = warpgroup_mma(qb, kb_s.index(nslot).permute((1, 0)), s_tok, is_async=True)
                mbarrier.wait(v_ready.index(slot), (gt // NUM_BUF) & 1)
                acc_tok = warpgroup_mma(p_op, v_s.index(slot), acc, is_async=True)
                x = warpgroup_mma_wait(1, deps=[s_tok])  # QK(t+1) done; PV(t) may still run
                mbarrier.arrive(k_empty.index(nslot))
                if gt + 1 >= int_hi_g:
                    j = (gt + 1 - g) * BLOCK_N + cn
                    visible = (j[None, :] <= pos[:, None]) & (j < seq_len)[None, :]
                    x = gl.where(visible, x, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(x, 1) * qk_scale)
                p = gl.exp2(x * qk_scale - m_new[:, None])
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha + gl.sum(p, 1)
                m_i = m_new
                acc = warpgroup_mma_wait(0, deps=[acc_tok])  # PV(t) done
                mbarrier.arrive(v_empty.index(slot))
                acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
                p_op = gl.convert_layout(p.to(v_s.dtype), p_layout)
            mbarrier.arrive(q_empty.index(2 + c))  # every QK of this item is done: Q may be refilled
            mbarrier.arrive(q_empty.index(c))
            # last tile: PV(n_tiles - 1)
            gt = g + n_tiles - 1
            slot = gt % NUM_BUF
            mbarrier.wait(v_ready.index(slot), (gt // NUM_BUF) & 1)
            v_tile = v_s.index(slot)
            if last_partial:
                fix_phases = _fix_v_tail(c, v_tile, v_fixed, slot, fix_phases, seq_len, (n_tiles - 1) * BLOCK_N,
                                         BLOCK_N, DV)
            acc_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            mbarrier.arrive(v_fixed.index(NUM_BUF))  # this consumer's last PV has read the V tile

            if USE_SINKS:
                m_f = gl.maximum(m_i, sink_log2)
                corr = gl.exp2(m_i - m_f)
                l_i = l_i * corr + gl.exp2(sink_log2 - m_f)
                acc = acc * gl.convert_layout(corr, o_rows)[:, None]
            out = acc * gl.convert_layout(1.0 / l_i, o_rows)[:, None]
            # coalesced store (exp30) staged in the item's last V tile once
            # both consumers' PVs are done with it, so Q was free for the
            # next item as soon as the loop ended (exp35e)
            out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
            mbarrier.wait(v_fixed.index(NUM_BUF), k & 1)
            stage = v_tile.slice(c * HALF_M, HALF_M)
            stage.store(out.to(out_ptr.dtype.element_ty))
            out_c = stage.load(out_layout)
            r = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, out_layout))
            dv = gl.arange(0, DV, layout=gl.SliceLayout(0, out_layout))
            t_row = (q_row + c * HALF_M + r).to(gl.int64)
            offs = t_row[:, None] * stride_o0 + h.to(gl.int64) * stride_o1 + dv[None, :]
            gl.store(out_ptr + offs, out_c, mask=(r0 + r < q_len)[:, None])
            fence_async_shared()
            mbarrier.arrive(v_empty.index(slot))
            g += n_tiles
            k += 1
            mbarrier.wait(info_ready.index(k % 2), (k // 2) & 1)
            info = info_s.index(k % 2).load(info_layout)
            n_tiles = _field(info, idx, 0)

    @gluon.jit
    def _p_producer(qa_desc, qb_desc, ka_desc, kb_desc, v_desc, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready,
                  info_empty, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                  qsl_ptr, seq_lens_ptr, bt_ptr, counter_ptr, stride_bt0, num_bt_cols, oob_row, num_seqs, num_heads,
                  n_q, n_items,
                  q_len_lo, q_len_hi,
                  G: gl.constexpr, DQK: gl.constexpr, D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, NUM_BUF: gl.constexpr,
                  INFO: gl.constexpr):
        """Walks this program's work items, publishes each served one to the
        consumers (record ring of 2), loads its Q halves once they are free,
        then its K/V tiles as BLOCK_N // BLOCK_SIZE page boxes each; ends with
        a record of n_tiles == 0."""
        HALF_M: gl.constexpr = BLOCK_M // 2
        PAGES: gl.constexpr = BLOCK_N // BLOCK_SIZE
        id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        info_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        idx = gl.arange(0, INFO, layout=info_layout)
        g = 0
        k = 0
        # sequence cursor: a program's items come in falling query-tile order,
        # so its sequence index only falls; its metadata stays in registers
        s = num_seqs - 1
        s_q = gl.load(qsl_ptr + s)
        s_tile = s_q // BLOCK_M + s  # first tile index of sequence s
        s_len = gl.load(qsl_ptr + s + 1) - s_q
        s_seq = gl.load(seq_lens_ptr + s)
        # work items by a global counter (greedy, heavy-first: a program takes
        # the next item when it has issued its current one's loads)
        j = gl.atomic_add(counter_ptr, 1)
        while j < n_items:
            j_next = gl.atomic_add(counter_ptr, 1)  # its latency hides behind this item's loads
            h = j % num_heads
            pid_q = n_q - 1 - j // num_heads  # last-first: the tiles with the most keys start first
            if s_tile > pid_q:
                lo = pid_q * 0
                hi = s - 1
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    go_right = gl.load(qsl_ptr + mid) // BLOCK_M + mid <= pid_q
                    lo = gl.where(go_right, mid, lo)
                    hi = gl.where(go_right, hi, mid - 1)
                s = lo
                s_q = gl.load(qsl_ptr + s)
                s_tile = s_q // BLOCK_M + s
                s_len = gl.load(qsl_ptr + s + 1) - s_q
                s_seq = gl.load(seq_lens_ptr + s)
            q0 = (pid_q - s_tile) * BLOCK_M
            if (q0 < s_len) & (s_len >= q_len_lo) & (s_len <= q_len_hi):
                ctx = s_seq - s_len
                n_tiles = (ctx + gl.minimum(q0 + BLOCK_M, s_len) + BLOCK_N - 1) // BLOCK_N
                islot = k % 2
                mbarrier.wait(info_empty.index(islot), ((k // 2) & 1) ^ 1)
                rec = gl.where(idx == 0, n_tiles, gl.where(idx == 1, s_q + q0, gl.where(
                    idx == 2, q0, gl.where(idx == 3, s_len, gl.where(idx == 4, s_seq, gl.where(
                        idx == 5, h, 0))))))
                info_s.index(islot).store(rec)
                mbarrier.arrive(info_ready.index(islot))
                bt_row = bt_ptr + s.to(gl.int64) * stride_bt0
                kv_col0 = (h // G) * (DQK + DV)
                pi = gl.arange(0, PAGES, layout=id_layout)
                okp = (pi < num_bt_cols) & (pi * BLOCK_SIZE < s_seq)
                rows = gl.where(okp, gl.load(bt_row + pi, mask=okp, other=0) * BLOCK_SIZE, oob_row)
                for t in range(0, n_tiles):
                    gt = g + t
                    slot = gt % NUM_BUF
                    phase = ((gt // NUM_BUF) & 1) ^ 1  # a fresh barrier passes a wait for parity 1
                    cur = rows
                    colv = (t + 1) * PAGES + pi
                    okp = (colv < num_bt_cols) & (colv * BLOCK_SIZE < s_seq) & (t + 1 < n_tiles)
                    rows = gl.where(okp, gl.load(bt_row + colv, mask=okp, other=0) * BLOCK_SIZE, oob_row)
                    load_kv_tile(ka_desc, kb_desc, v_desc, ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty, slot,
                                 phase, cur, pi, kv_col0, D1, D2, DV, BLOCK_N, BLOCK_SIZE)
                    # Q after tile 0's K/V (whose slots free up first), when the
                    # consumers' loops end (the output leaves through the last
                    # V tile, whose slot is refilled after it)
                    if t == 0:
                        for c in gl.static_range(2):
                            mbarrier.wait(q_empty.index(2 + c), (k & 1) ^ 1)
                            mbarrier.expect(q_ready.index(2 + c), HALF_M * D2 * 2)
                            tma.async_copy_global_to_shared(qb_desc, [s_q + q0 + c * HALF_M, h * DQK + D1],
                                                            q_ready.index(2 + c), qb_s.index(c))
                        for c in gl.static_range(2):
                            mbarrier.wait(q_empty.index(c), (k & 1) ^ 1)
                            mbarrier.expect(q_ready.index(c), HALF_M * D1 * 2)
                            tma.async_copy_global_to_shared(qa_desc, [s_q + q0 + c * HALF_M, h * DQK],
                                                            q_ready.index(c), qa_s.index(c))
                g += n_tiles
                k += 1
            j = j_next
        islot = k % 2  # end record
        mbarrier.wait(info_empty.index(islot), ((k // 2) & 1) ^ 1)
        info_s.index(islot).store(gl.zeros([INFO], gl.int32, info_layout))
        mbarrier.arrive(info_ready.index(islot))
        # the last program to finish resets the counters for the next launch
        done = gl.atomic_add(counter_ptr + 1, 1)
        if done == gl.num_programs(0) - 1:
            gl.atomic_xchg(counter_ptr, 0)
            gl.atomic_xchg(counter_ptr + 1, 0)

    @gluon.jit
    def _persistent_kernel(
        qa_desc, qb_desc,  # query as [T, H * DQK]: boxes [BLOCK_M // 2, D1], [BLOCK_M // 2, D2]
        ka_desc, kb_desc, v_desc,  # cache as [num_blocks * BLOCK_SIZE, Hkv * (DQK + DV)]: page boxes
        out_ptr,  # [T, H, DV]
        qsl_ptr,  # [S + 1] int32
        seq_lens_ptr,  # [S] int32
        bt_ptr,  # [S, num_bt_cols] int32
        sinks_ptr,  # [H] fp32 (USE_SINKS)
        counter_ptr,  # [2] int32, zero: next work item, finished programs (reset by the last)
        num_seqs, num_heads, n_q, num_bt_cols, stride_bt0, oob_row, q_len_lo, q_len_hi, qk_scale, stride_o0,
        stride_o1,
        G: gl.constexpr, DQK: gl.constexpr, D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, NUM_BUF: gl.constexpr,
        USE_SINKS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ):
        """Persistent (perf exp35): each program takes work items -- (query
        tile, head), heavy-first: query tile slot ``n_q - 1`` down to 0 over
        ``T // BLOCK_M + S`` slots (sequence s owns the slots from
        ``query_start_loc[s] // BLOCK_M + s``), heads fastest -- from a global
        counter until none are left (greedy). Slots past their sequence's
        queries, or whose ``q_len`` lies outside [q_len_lo, q_len_hi], are
        skipped. The producer publishes each item to the consumers (a record
        in shared memory, read through ``redux.sync`` so that ptxas keeps the
        loop uniform) and loads the next item's Q and first K/V while the
        consumers finish the current one. The last program to finish resets
        the counter, so a launch leaves it zeroed for the next."""
        HALF_M: gl.constexpr = BLOCK_M // 2
        INFO: gl.constexpr = 8
        n_items = n_q * num_heads
        qa_s = gl.allocate_shared_memory(qa_desc.dtype, [2, HALF_M, D1], qa_desc.layout)
        qb_s = gl.allocate_shared_memory(qb_desc.dtype, [2, HALF_M, D2], qb_desc.layout)
        ka_s = gl.allocate_shared_memory(ka_desc.dtype, [NUM_BUF, BLOCK_N, D1], ka_desc.layout)
        kb_s = gl.allocate_shared_memory(kb_desc.dtype, [NUM_BUF, BLOCK_N, D2], kb_desc.layout)
        v_s = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, BLOCK_N, DV], v_desc.layout)
        info_s = gl.allocate_shared_memory(gl.int32, [2, INFO], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        info_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        info_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())  # [c]: chunk 1, [2 + c]: 2
        q_empty = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        # v_fixed[NUM_BUF]: both consumers' last PV of an item is done (count 2)
        v_fixed = gl.allocate_shared_memory(gl.int64, [NUM_BUF + 1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(info_ready.index(i), count=1)
            mbarrier.init(info_empty.index(i), count=2)
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=1)
            mbarrier.init(q_ready.index(2 + i), count=1)
            mbarrier.init(q_empty.index(2 + i), count=1)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
            mbarrier.init(v_fixed.index(i), count=1)
        mbarrier.init(v_fixed.index(NUM_BUF), count=2)

        gl.warp_specialize([
            (_p_consumer, (0, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready, info_empty, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, v_fixed, out_ptr, sinks_ptr, qk_scale, stride_o0, stride_o1,
                         HALF_M, BLOCK_N, DV, NUM_BUF, INFO, USE_SINKS)),
            (_p_consumer, (1, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready, info_empty, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, v_fixed, out_ptr, sinks_ptr, qk_scale, stride_o0, stride_o1,
                         HALF_M, BLOCK_N, DV, NUM_BUF, INFO, USE_SINKS)),
            (_p_producer, (qa_desc, qb_desc, ka_desc, kb_desc, v_desc, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready,
                         info_empty, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, qsl_ptr, seq_lens_ptr,
                         bt_ptr, counter_ptr, stride_bt0, num_bt_cols, oob_row, num_seqs, num_heads, n_q, n_items,
                         q_len_lo, q_len_hi, G, DQK, D1, D2, DV, BLOCK_M, BLOCK_N, BLOCK_SIZE, NUM_BUF, INFO)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def _descriptor(t: torch.Tensor, box: list[int]):
    dt = _gl_dtype(t.dtype)
    return _GluonDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dt))


def kv_descriptors(kv_cache: torch.Tensor, head_size: int) -> tuple:
    """TMA descriptors of K chunk 1, K chunk 2 and V over the cache's rows
    ``[num_blocks * block_size, Hkv * (Dqk + Dv)]``, boxes of one page."""
    num_blocks, block_size, Hkv, width = kv_cache.shape
    d1, d2 = SERVED_SHAPES[(head_size, width - head_size)]
    rows = kv_cache.view(num_blocks * block_size, Hkv * width)
    return (_descriptor(rows, [block_size, d1]), _descriptor(rows, [block_size, d2]),
            _descriptor(rows, [block_size, width - head_size]))


def descriptors(query: torch.Tensor, kv_cache: torch.Tensor) -> tuple:
    """TMA descriptors: Q chunks over ``[T, H * Dqk]`` (boxes of BLOCK_M // 2
    rows), then :func:`kv_descriptors`."""
    T, H, Dqk = query.shape
    d1, d2 = SERVED_SHAPES[(Dqk, kv_cache.shape[3] - Dqk)]
    q2 = query.as_strided((T, H * Dqk), (query.stride(0), 1))
    half = BLOCK_M // 2
    return (_descriptor(q2, [half, d1]), _descriptor(q2, [half, d2])) + kv_descriptors(kv_cache, Dqk)


def compile_offline(fn, constexprs: dict, types: dict, descs: tuple):
    """Compile a Gluon kernel of this package for sm_90 on any machine (no
    GPU; ptxas ships with Triton). ``types``: Triton type strings of the
    non-descriptor arguments (others default to i32); ``descs``: example
    descriptors for the kernel's leading ``*_desc`` arguments, in order."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    names = [n for n in fn.arg_names if n.endswith("_desc")]
    all_types = dict(zip(names, [mangle_type(d) for d in descs]))
    all_types.update(types)
    signature = {n: "constexpr" if n in constexprs else all_types.get(n, "i32") for n in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=signature,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def build_offline(block_size: int, use_sinks: bool, dtype: torch.dtype = torch.bfloat16, persistent: bool = False):
    """Compile the kernel (``persistent``: the persistent one) for sm_90 on
    any machine (no GPU; ptxas ships with Triton) and return the compiled
    kernel -- for tests and perf/ tools. Needs a process where Triton is not
    in interpreter mode."""
    query = torch.empty(256, 16, 192, dtype=dtype)
    cache = torch.empty(32, block_size, 2, 320, dtype=dtype)
    constexprs = dict(G=8, DQK=192, D1=128, D2=64, DV=128, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size,
                      NUM_BUF=NUM_BUF, USE_SINKS=use_sinks, CONSUMER_REGS=CONSUMER_REGS,
                      PRODUCER_REGS=PERSISTENT_PRODUCER_REGS if persistent else PRODUCER_REGS)
    elem = "bf16" if dtype == torch.bfloat16 else "fp16"
    types = dict(out_ptr=f"*{elem}", qsl_ptr="*i32", seq_lens_ptr="*i32", bt_ptr="*i32", sinks_ptr="*fp32",
                 counter_ptr="*i32", qk_scale="fp32")
    return compile_offline(_persistent_kernel if persistent else _prefill_kernel, constexprs, types,
                           descriptors(query, cache))


def prefill(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            block_table: torch.Tensor, out: torch.Tensor, *, scale: float, sinks: torch.Tensor | None,
            q_len_range: tuple[int, int], counter: torch.Tensor | None = None,
            num_sms: int | None = None) -> torch.Tensor:
    """Causal attention for the sequences whose ``q_len`` lies in
    ``q_len_range`` (the caller checked :func:`unsupported_reasons` is
    empty). Shapes as :func:`diffkv.triton.kernels.attention.paged_attention`;
    no allocation, no host sync (CUDA-graph capturable).

    ``counter`` (int32 [2], zero; a launch leaves it zero) and ``num_sms``:
    run the persistent kernel on ``num_sms`` programs (perf exp35e: 4x2k 4 %
    faster). It keeps every SM until it ends, so a caller that overlaps
    another kernel with it (the mixed batch's decode launch) passes None:
    one program per (query tile, head)."""
    T, H, Dqk = query.shape
    num_blocks, block_size, Hkv, width = kv_cache.shape
    d1, d2 = SERVED_SHAPES[(Dqk, width - Dqk)]
    S = seq_lens.shape[0]
    if counter is not None and num_sms:
        n_q = T // BLOCK_M + S  # query tile slots (see _persistent_kernel)
        _persistent_kernel[(max(1, min(H * n_q, num_sms)),)](
            *descriptors(query, kv_cache), out, query_start_loc, seq_lens, block_table,
            sinks if sinks is not None else seq_lens, counter,
            S, H, n_q, block_table.shape[1], block_table.stride(0), num_blocks * block_size, q_len_range[0],
            q_len_range[1], float(scale * LOG2E), out.stride(0), out.stride(1),
            G=H // Hkv, DQK=Dqk, D1=d1, D2=d2, DV=width - Dqk, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_SIZE=block_size, NUM_BUF=NUM_BUF, USE_SINKS=sinks is not None, CONSUMER_REGS=CONSUMER_REGS,
            PRODUCER_REGS=PERSISTENT_PRODUCER_REGS, num_warps=4,
        )
        return out
    grid = (H, T // BLOCK_M + S)
    _prefill_kernel[grid](
        *descriptors(query, kv_cache), out, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens,
        S, block_table.shape[1], block_table.stride(0), num_blocks * block_size, q_len_range[0], q_len_range[1],
        float(scale * LOG2E), out.stride(0), out.stride(1),
        G=H // Hkv, DQK=Dqk, D1=d1, D2=d2, DV=width - Dqk, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size,
        NUM_BUF=NUM_BUF, USE_SINKS=sinks is not None, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=4,
    )
    return out
