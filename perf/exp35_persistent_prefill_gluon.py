"""exp35 (perf/NOTES.md): exp26's persistent Gluon prefill brought up to the
product's other changes -- a spill-free producer (40 registers), page ids
read once per tile as one vector (the next tile's while the current one's
boxes fly), one reciprocal per row -- with a self-resetting work counter (no
memset per call) and an optional per-item timeline (``tl``: %globaltimer at
each item's record, tile 0's K, the loop's end and the store; %smid) to see
where a persistent program loses per tile. Output stored as exp26 did (from
the accumulator layout): the product's coalesced store stages through the Q
buffer, which the next item's prefetched Q occupies here.

    python perf/exp25.py product perf/exp35_persistent_prefill_gluon.py
    python perf/exp33_timeline.py perf/exp35_persistent_prefill_gluon.py

Outcome (H100, perf/logs/exp35{a,b,c}_h100.log): falsified a third time,
but the per-tile loss of exp26 is found. (a) As first written, the
consumers' inner loop ran 839-847 SASS instructions per tile against the
product's 738: the loop bounds came from the record in shared memory, which
ptxas cannot prove warp-uniform, so it computed every wgmma descriptor in
vector registers and moved it with R2UR (64 per tile) -- per tile 2.76 vs
2.21 us at 4x2k. (b) Passing each record field through ``redux.sync``
(a uniform result) brings the loop to 743 instructions; transitions shrink
(tile 0's K 1.9 -> 0.6 us, no lookups; gap 1.3 -> 0.9 us) but the tail grows
(uncoalesced store: 0.9 -> 1.6 us). (c) Untimed A/B, outputs bitwise equal:
4x2k 0.317 -> 0.325 ms, 1x8k 1.073 -> 1.100 ms, 2k chunk 0.199-0.204 ->
0.206 ms, mixed 0.419 -> 0.437 ms. The per-tile time in the loop is still
3-10 % above the product's (4x2k p50 2.25 vs 1.98 us) with the same
instruction count. (d) This file's final state: the output stored coalesced
through Q's first chunk, Q loaded in two chunks with their own barriers
(the second chunk refilled when the loops end, the first after the store;
tile 0's K/V issued before either), %clock64 beside the timers
(perf/logs/exp35d_h100.log, exp36_h100.log; outputs now differ from the
product's by one bf16 ulp: QK(0) sums its two chunks in the other order):
transitions per item ~1.7 us (tile 0 0.2, gap 0.4, tail 1.1) against the
product's ~4.6, but per tile in the loop 2.23 vs 2.02 us (p50, 4x2k) at the
same SM clock (1659 vs 1647 MHz); untimed A/B 4x2k 0.3205 -> 0.3181 ms,
1x8k 1.074 -> 1.085 ms, 2k chunk 0.201-0.202 -> 0.204-0.205 ms, mixed
0.421 -> 0.436 ms. Level. Part of its "loop" time was the wait for Q's
first chunk, loaded only after the previous item's output had left through
it. (e) This file's final state: the output is staged in the item's last V
tile instead (both consumers' last PVs done: an mbarrier of count 2; the
slot is released after the store, and the next item's tile 1 V waits for
it), so both Q chunks are released when the loops end and loaded right
after tile 0's K/V. Outcome (H100, perf/logs/exp35e_h100.log, matmul 745
TFLOP/s, outputs within one bf16 ulp of the product's): **4x2k 0.3099 /
0.3124 -> 0.2974 / 0.3004 ms (74.4 / 73.9 -> 77.6 / 76.8 % of matmul)**,
1x8k 1.028 / 1.035 -> 1.030 / 1.045 ms, 2k chunk 0.196 / 0.195 -> 0.196 /
0.196 ms, but the mixed batch 0.4186 / 0.4182 -> 0.4300 / 0.4311 ms: its
decode half runs beside the prefill on a side stream, and persistent
programs hold every SM until the prefill ends (the non-persistent product
hands SMs back program by program). Adopted for pure prefill launches as
``diffkv.triton.kernels.prefill_gluon._persistent_kernel`` (the counter in
the Workspace; the mixed batch keeps one program per tile).

Original module docstring follows: Hopper (sm_90) causal prefill written in Gluon, Triton's lower-level
dialect (``triton.experimental.gluon``, shipped with Triton >= 3.5).

Why a second prefill kernel: Triton 3.6 waits for every wgmma right after it
is issued, so in the Triton kernel QK -> softmax -> PV run one after another
on each SM (perf/exp21-22; its automatic Hopper warp specialization hangs,
perf/exp20). Here each program holds 128 query rows of one head and runs
three partitions (``gl.warp_specialize``):

* two consumer warpgroups, 64 rows each. Per KV tile t a consumer runs the
  softmax of tile t while its PV(t-1) is still on the tensor cores, then
  issues QK(t+1) and PV(t) and waits for QK(t+1) only; the two warpgroups are
  independent, so one's softmax also overlaps the other's matrix work;
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
PRODUCER_REGS = 32
SERVED_SHAPES = {(192, 128): (128, 64)}
"""(Dqk, Dv) -> (D1, D2): the K/Q width in two power-of-two chunks."""
SERVED_BLOCK_SIZES = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


def unsupported_reasons(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, *, scale: float,
                        sliding_window, softcap, alibi_slopes, arch: str, interpreted: bool) -> list[str]:
    """Every reason this kernel cannot serve the call (empty: it can).
    Host-only: shapes, strides, dtypes and flags; no device read."""
    reasons = []
    if not AVAILABLE:
        reasons.append("triton.experimental.gluon is not available in this Triton")
    if interpreted:
        reasons.append("the Triton interpreter does not run Gluon kernels")
    if query.device.type != "cuda" or arch != "sm90":
        reasons.append(f"needs an sm_90 CUDA device (got {query.device.type}, arch {arch})")
    if query.dtype not in (torch.bfloat16, torch.float16) or kv_cache.dtype != query.dtype \
            or out.dtype != query.dtype:
        reasons.append(f"needs bf16/fp16 query, cache and output of one dtype (got {query.dtype}, "
                       f"{kv_cache.dtype}, {out.dtype})")
    T, H, Dqk = query.shape
    num_blocks, block_size, Hkv, width = kv_cache.shape
    Dv = width - Dqk
    if (Dqk, Dv) not in SERVED_SHAPES:
        reasons.append(f"head sizes (Dqk={Dqk}, Dv={Dv}) not in {sorted(SERVED_SHAPES)}")
    if block_size not in SERVED_BLOCK_SIZES:
        reasons.append(f"block_size={block_size} not in {SERVED_BLOCK_SIZES}")
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
    def _timer(x):
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def _clock(x):
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [x], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def _smid(x):
        return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)

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
    def _consumer(c: gl.constexpr, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready, info_empty, q_ready, q_empty,
                  k_ready, v_ready, k_empty, v_empty, v_fixed, out_ptr, sinks_ptr, tl_ptr, qk_scale, stride_o0, stride_o1,
                  HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr, NUM_BUF: gl.constexpr,
                  INFO: gl.constexpr, USE_SINKS: gl.constexpr, TIMELINE: gl.constexpr):
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
            item = _field(info, idx, 6)
            if TIMELINE:
                t_info = _timer(h)
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
            if TIMELINE:
                t_k0 = _timer(h)
                c_k0 = _clock(h)
            # Q's second chunk first: its buffer is refilled as soon as the
            # previous item's loop ends; the first chunk's only after its
            # output went out through it
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
            if TIMELINE:
                t_loop = _timer(h)
                c_loop = _clock(h)
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
            # coalesced store through Q's first chunk (product, exp30), then
            # that chunk is free for the next item's Q
            out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
            # staged in the last V tile (both consumers' PVs are done with
            # it), so Q is free for the next item as soon as the loop ends
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
            if TIMELINE:
                t_end = _timer(h)
                if c == 0:
                    rec = tl_ptr + item.to(gl.int64) * 16
                    gl.store(rec + 0, t_info)
                    gl.store(rec + 1, t_info)
                    gl.store(rec + 2, t_k0)
                    gl.store(rec + 3, t_loop)
                    gl.store(rec + 4, t_end)
                    gl.store(rec + 5, _smid(h).to(gl.int64))
                    gl.store(rec + 6, n_tiles.to(gl.int64))
                    gl.store(rec + 7, c_k0)
                    gl.store(rec + 8, c_loop)

            g += n_tiles
            k += 1
            mbarrier.wait(info_ready.index(k % 2), (k // 2) & 1)
            info = info_s.index(k % 2).load(info_layout)
            n_tiles = _field(info, idx, 0)

    @gluon.jit
    def _producer(qa_desc, qb_desc, ka_desc, kb_desc, v_desc, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready,
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
                        idx == 5, h, gl.where(idx == 6, j, 0)))))))
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
                    mbarrier.wait(k_empty.index(slot), phase)
                    mbarrier.expect(k_ready.index(slot), BLOCK_N * (D1 + D2) * 2)
                    for i in gl.static_range(PAGES):
                        row = gl.sum(gl.where(pi == i, cur, 0), 0)
                        tma.async_copy_global_to_shared(ka_desc, [row, kv_col0], k_ready.index(slot),
                                                        ka_s.index(slot).slice(i * BLOCK_SIZE, BLOCK_SIZE))
                        tma.async_copy_global_to_shared(kb_desc, [row, kv_col0 + D1], k_ready.index(slot),
                                                        kb_s.index(slot).slice(i * BLOCK_SIZE, BLOCK_SIZE))
                    mbarrier.wait(v_empty.index(slot), phase)
                    mbarrier.expect(v_ready.index(slot), BLOCK_N * DV * 2)
                    for i in gl.static_range(PAGES):
                        row = gl.sum(gl.where(pi == i, cur, 0), 0)
                        tma.async_copy_global_to_shared(v_desc, [row, kv_col0 + D1 + D2], v_ready.index(slot),
                                                        v_s.index(slot).slice(i * BLOCK_SIZE, BLOCK_SIZE))
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
    def _prefill_kernel(
        qa_desc, qb_desc,  # query as [T, H * DQK]: boxes [BLOCK_M // 2, D1], [BLOCK_M // 2, D2]
        ka_desc, kb_desc, v_desc,  # cache as [num_blocks * BLOCK_SIZE, Hkv * (DQK + DV)]: page boxes
        out_ptr,  # [T, H, DV]
        qsl_ptr,  # [S + 1] int32
        seq_lens_ptr,  # [S] int32
        bt_ptr,  # [S, num_bt_cols] int32
        sinks_ptr,  # [H] fp32 (USE_SINKS)
        counter_ptr,  # [2] int32, zero: next work item, finished programs (reset by the last)
        tl_ptr,  # [items, 16] int64 (TIMELINE)
        num_seqs, num_heads, n_q, num_bt_cols, stride_bt0, oob_row, q_len_lo, q_len_hi, qk_scale, stride_o0,
        stride_o1,
        G: gl.constexpr, DQK: gl.constexpr, D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, NUM_BUF: gl.constexpr,
        USE_SINKS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        TIMELINE: gl.constexpr,
    ):
        """Persistent: program p serves work items p, 2P - 1 - p, 2P + p, ...
        of the list (query tile, head) ordered heavy-first -- query tile index
        ``n_q - 1`` down to 0 over ``T // BLOCK_M + S`` tile slots (each
        sequence starts a new tile: sequence s owns slots from
        ``query_start_loc[s] // BLOCK_M + s``), heads fastest. Items whose
        slot is past its sequence's queries, or whose ``q_len`` lies outside
        [q_len_lo, q_len_hi], are skipped. While the consumers finish one
        item, the producer already loads the next one's Q and first K/V."""
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
        v_fixed = gl.allocate_shared_memory(gl.int64, [NUM_BUF + 1, 1], mbarrier.MBarrierLayout())  # [NUM_BUF]: PVs done
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
            (_consumer, (0, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready, info_empty, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, v_fixed, out_ptr, sinks_ptr, tl_ptr, qk_scale, stride_o0, stride_o1,
                         HALF_M, BLOCK_N, DV, NUM_BUF, INFO, USE_SINKS, TIMELINE)),
            (_consumer, (1, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready, info_empty, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, v_fixed, out_ptr, sinks_ptr, tl_ptr, qk_scale, stride_o0, stride_o1,
                         HALF_M, BLOCK_N, DV, NUM_BUF, INFO, USE_SINKS, TIMELINE)),
            (_producer, (qa_desc, qb_desc, ka_desc, kb_desc, v_desc, qa_s, qb_s, ka_s, kb_s, v_s, info_s, info_ready,
                         info_empty, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, qsl_ptr, seq_lens_ptr,
                         bt_ptr, counter_ptr, stride_bt0, num_bt_cols, oob_row, num_seqs, num_heads, n_q, n_items, q_len_lo,
                         q_len_hi, G, DQK, D1, D2, DV, BLOCK_M, BLOCK_N, BLOCK_SIZE, NUM_BUF, INFO)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def descriptors(query: torch.Tensor, kv_cache: torch.Tensor) -> tuple:
    """TMA descriptors: Q chunks over ``[T, H * Dqk]`` (boxes of BLOCK_M // 2
    rows), K chunks and V over the cache's rows ``[num_blocks * block_size,
    Hkv * (Dqk + Dv)]`` (boxes of one page)."""
    T, H, Dqk = query.shape
    num_blocks, block_size, Hkv, width = kv_cache.shape
    d1, d2 = SERVED_SHAPES[(Dqk, width - Dqk)]
    dt = _gl_dtype(query.dtype)
    q2 = query.as_strided((T, H * Dqk), (query.stride(0), 1))
    rows = kv_cache.view(num_blocks * block_size, Hkv * width)
    half = BLOCK_M // 2

    def desc(t, box):
        return _GluonDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dt))

    return (desc(q2, [half, d1]), desc(q2, [half, d2]), desc(rows, [block_size, d1]), desc(rows, [block_size, d2]),
            desc(rows, [block_size, width - Dqk]))


def build_offline(block_size: int, use_sinks: bool, dtype: torch.dtype = torch.bfloat16):
    """Compile the kernel for sm_90 on any machine (no GPU; ptxas ships with
    Triton) and return the compiled kernel -- for tests and perf/ tools. Needs
    a process where Triton is not in interpreter mode."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    query = torch.empty(256, 16, 192, dtype=dtype)
    cache = torch.empty(32, block_size, 2, 320, dtype=dtype)
    fn = _prefill_kernel
    constexprs = dict(G=8, DQK=192, D1=128, D2=64, DV=128, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size,
                      NUM_BUF=NUM_BUF, USE_SINKS=use_sinks, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
                      TIMELINE=True)
    types = dict(zip(["qa_desc", "qb_desc", "ka_desc", "kb_desc", "v_desc"],
                     [mangle_type(d) for d in descriptors(query, cache)]))
    elem = "bf16" if dtype == torch.bfloat16 else "fp16"
    types.update(out_ptr=f"*{elem}", qsl_ptr="*i32", seq_lens_ptr="*i32", bt_ptr="*i32", sinks_ptr="*fp32", counter_ptr="*i32", tl_ptr="*i64",
                 qk_scale="fp32")
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=signature,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


_SMS: dict[int, int] = {}
_COUNTERS: dict = {}


def _counter(device):
    """Zeroed int32[2] per device, left zeroed by every launch."""
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _COUNTERS[device]




def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: the persistent grid's size."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def prefill(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            block_table: torch.Tensor, out: torch.Tensor, *, scale: float, sinks: torch.Tensor | None,
            q_len_range: tuple[int, int], tl: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for the sequences whose ``q_len`` lies in
    ``q_len_range`` (the caller checked :func:`unsupported_reasons` is
    empty). Shapes as :func:`diffkv.triton.kernels.attention.paged_attention`;
    no allocation, no host sync (CUDA-graph capturable)."""
    T, H, Dqk = query.shape
    num_blocks, block_size, Hkv, width = kv_cache.shape
    d1, d2 = SERVED_SHAPES[(Dqk, width - Dqk)]
    S = seq_lens.shape[0]
    n_q = T // BLOCK_M + S  # query tile slots (see _prefill_kernel)
    grid = (min(H * n_q, _num_sms(query.device)),)
    _prefill_kernel[grid](
        *descriptors(query, kv_cache), out, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens, _counter(query.device), tl if tl is not None else seq_lens,
        S, H, n_q, block_table.shape[1], block_table.stride(0), num_blocks * block_size, q_len_range[0],
        q_len_range[1], float(scale * LOG2E), out.stride(0), out.stride(1),
        G=H // Hkv, DQK=Dqk, D1=d1, D2=d2, DV=width - Dqk, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size,
        NUM_BUF=NUM_BUF, USE_SINKS=sinks is not None, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        TIMELINE=tl is not None, num_warps=4,
    )
    return out


from diffkv.triton.kernels.prefill_gluon import layer_reasons, unsupported_reasons  # noqa: E402,F401,F811
