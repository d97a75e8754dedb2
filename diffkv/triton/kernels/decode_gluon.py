"""Hopper (sm_90) split-KV decode written in Gluon.

Why a second decode kernel: decodes are bound by the bytes of the KV cache,
and the Triton decode keeps at most ``num_stages - 1`` tiles in flight per
program, each behind its own block-table read; at batch 16 x 8k it stays ~6 %
below the paged-read floor (perf/NOTES.md, exp16-19). Here a producer warp
streams the pages of each KV tile by TMA (one box per cache page) into a
shared-memory ring that is :data:`NUM_BUF` tiles deep, reading the page ids
of the next tile while the current one is in flight; one consumer warpgroup
only computes. Each program holds the query rows of one KV head -- up to
``64 // G`` query tokens x the ``G`` query heads that share it (GQA rows
packed, one 64-row wgmma tile) -- and one range of KV tiles (a split); the
splits' partial results go through the same reduce as the Triton kernel's.

Rows past the sequence inside its last page (whatever they hold, NaN
included) are masked out of the scores, and the consumer zeroes them in the V
tile before PV reads them; pages past the block table's width or past the
sequence are loaded from a row past the cache's end, which TMA fills with
zeros.

Served: what :mod:`.prefill_gluon` serves (bf16/fp16, Dqk = 128 + 64,
Dv = 128, contiguous caches with 16..128-token pages, causal attention with
optional sinks), with ``G <= 64`` query heads per KV head.
"""

from __future__ import annotations

import torch

from . import prefill_gluon as _pg

if _pg.AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from .prefill_gluon import load_kv_tile, tile_owner

BLOCK_M = 64
"""Rows per program: query tokens x query heads of one KV head (one wgmma
tile of a warpgroup)."""
BLOCK_N = 64
"""Keys per KV tile (at least one cache page: ``max(BLOCK_N, block_size)``)."""
RING_KEYS = 256
"""Keys the K/V ring holds: 4 tiles of 64 keys (160 KB in flight per SM), or
2 of 128 keys for 128-token pages."""
PRODUCER_REGS = 40
LOG2E = 1.4426950408889634


def tile_keys(block_size: int) -> int:
    """Keys per KV tile for a cache page size (a tile holds whole pages)."""
    return max(BLOCK_N, block_size)


def ring_slots(block_size: int) -> int:
    """Depth of the K/V ring for a cache page size."""
    return max(2, RING_KEYS // tile_keys(block_size))


def query_tokens_per_tile(num_heads: int, num_kv_heads: int, max_query_len: int) -> int:
    """Query tokens per program: the largest power of two with ``tokens x G
    <= BLOCK_M``, no more than the batch's longest query needs."""
    G = num_heads // num_kv_heads
    qt = 1
    while qt * 2 * G <= BLOCK_M and qt < max(1, max_query_len):
        qt *= 2
    return qt


def unsupported_reasons(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, *, scale: float,
                        sliding_window, softcap, alibi_slopes, compute_capability: int | None,
                        interpreted: bool) -> list[str]:
    """Every reason this kernel cannot serve the call (empty: it can).
    Host-only: shapes, strides, dtypes and flags; no device read."""
    reasons = _pg.unsupported_reasons(query, kv_cache, out, scale=scale, sliding_window=sliding_window,
                                      softcap=softcap, alibi_slopes=alibi_slopes,
                                      compute_capability=compute_capability, interpreted=interpreted)
    G = query.shape[1] // kv_cache.shape[2]
    if G > BLOCK_M:
        reasons.append(f"{G} query heads per KV head (at most {BLOCK_M} share one program)")
    return reasons


if _pg.AVAILABLE:

    @gluon.jit
    def _consumer(ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty,
                  q_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, sinks_ptr,
                  q_start, q0, q_len, seq_len, ctx, kvh, tile_begin, n_tiles, split, num_splits, num_heads, qk_scale,
                  stride_q0, stride_q1, stride_o0, stride_o1,
                  G: gl.constexpr, QT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr, NUM_BUF: gl.constexpr,
                  SPLIT: gl.constexpr, USE_SINKS: gl.constexpr):
        """Rows: token ``q0 + r // G``, head ``kvh * G + r % G``; KV tiles
        ``[tile_begin, tile_begin + n_tiles)`` (n_tiles >= 1)."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DV, 16])
        qa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        v_reg_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)

        # Q: [BLOCK_M, D1] and [BLOCK_M, D2] straight into wgmma operand registers
        rq = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        q_ok = (rq < QT * G) & (q0 + rq // G < q_len)
        q_off = (q_start + q0 + rq // G).to(gl.int64) * stride_q0 + (kvh * G + rq % G).to(gl.int64) * stride_q1
        c1 = gl.arange(0, D1, layout=gl.SliceLayout(0, ld_layout))
        c2 = gl.arange(0, D2, layout=gl.SliceLayout(0, ld_layout))
        qa = gl.load(q_ptr + q_off[:, None] + c1[None, :], mask=q_ok[:, None], other=0.0)
        qb = gl.load(q_ptr + q_off[:, None] + (D1 + c2)[None, :], mask=q_ok[:, None], other=0.0)
        qa = gl.convert_layout(qa, qa_layout)
        qb = gl.convert_layout(qb, qa_layout)

        rs = gl.arange(0, BLOCK_M, layout=s_rows)
        pos = ctx + q0 + rs // G  # each row's position: keys j <= pos are visible
        cn = gl.arange(0, BLOCK_N, layout=s_cols)
        int_hi = (ctx + q0 + 1) // BLOCK_N  # tiles below: every key visible to every row
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)
        l_i = gl.zeros([BLOCK_M], gl.float32, s_rows)
        acc = gl.zeros([BLOCK_M, DV], gl.float32, o_layout)

        # tile 0: S = QK(0), softmax -> P(0)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(qa, ka_s.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(qb, kb_s.index(0).permute((1, 0)), s_tok, is_async=True)
        x = warpgroup_mma_wait(0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(0))
        if tile_begin >= int_hi:
            j = tile_begin * BLOCK_N + cn
            x = gl.where(j[None, :] <= pos[:, None], x, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(x, 1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
        p = gl.exp2(x * qk_scale - m_use[:, None])
        l_i = gl.sum(p, 1)
        m_i = m_new
        p_op = gl.convert_layout(p.to(v_s.dtype), p_layout)
        # steady state in FA3's order (see prefill_gluon): issue QK(t+1) and
        # PV(t), wait for QK(t+1), softmax(t+1) while PV(t) runs, wait PV(t)
        for t in range(0, n_tiles - 1):
            slot = t % NUM_BUF
            nslot = (t + 1) % NUM_BUF
            mbarrier.wait(k_ready.index(nslot), ((t + 1) // NUM_BUF) & 1)
            s_tok = warpgroup_mma(qa, ka_s.index(nslot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s_tok = warpgroup_mma(qb, kb_s.index(nslot).permute((1, 0)), s_tok, is_async=True)
            mbarrier.wait(v_ready.index(slot), (t // NUM_BUF) & 1)
            acc_tok = warpgroup_mma(p_op, v_s.index(slot), acc, is_async=True)
            x = warpgroup_mma_wait(1, deps=[s_tok])
            mbarrier.arrive(k_empty.index(nslot))
            if tile_begin + t + 1 >= int_hi:
                j = (tile_begin + t + 1) * BLOCK_N + cn
                x = gl.where(j[None, :] <= pos[:, None], x, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(x, 1) * qk_scale)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(x * qk_scale - m_use[:, None])
            alpha = gl.exp2(m_i - m_use)
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            mbarrier.arrive(v_empty.index(slot))
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            p_op = gl.convert_layout(p.to(v_s.dtype), p_layout)
        t = n_tiles - 1
        slot = t % NUM_BUF
        mbarrier.wait(v_ready.index(slot), (t // NUM_BUF) & 1)
        v_tile = v_s.index(slot)
        if (tile_begin + n_tiles) * BLOCK_N > seq_len:
            # rows past the sequence may hold NaN: zero them before PV reads them
            for i in gl.static_range(BLOCK_N // 32):
                rows = (tile_begin + t) * BLOCK_N + i * 32 + gl.arange(0, 32, layout=gl.SliceLayout(1, v_reg_layout))
                chunk = v_tile.slice(i * 32, 32)
                v_vals = chunk.load(v_reg_layout)
                chunk.store(gl.where((rows < seq_len)[:, None], v_vals, gl.zeros_like(v_vals)))
            fence_async_shared()
            gl.thread_barrier()
        acc_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc_tok])
        mbarrier.arrive(v_empty.index(slot))

        ro = gl.arange(0, BLOCK_M, layout=o_rows)
        row_ok = (ro < QT * G) & (q0 + ro // G < q_len)
        t_row = (q_start + q0 + ro // G).to(gl.int64)
        h = kvh * G + ro % G
        dv = gl.arange(0, DV, layout=o_cols)
        m_o = gl.convert_layout(m_i, o_rows)
        l_o = gl.convert_layout(l_i, o_rows)
        if SPLIT:
            slot_o = (t_row * num_heads + h) * num_splits + split
            gl.store(part_max_ptr + slot_o, m_o, mask=row_ok)
            gl.store(part_sum_ptr + slot_o, l_o, mask=row_ok)
            gl.store(part_out_ptr + slot_o[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None])
        else:
            if USE_SINKS:
                z = gl.load(sinks_ptr + h, mask=row_ok, other=0.0) * 1.4426950408889634
                m_f = gl.maximum(m_o, z)
                corr = gl.exp2(m_o - m_f)
                l_o = l_o * corr + gl.exp2(z - m_f)
                acc = acc * corr[:, None]
            out = acc * (1.0 / gl.where(row_ok, l_o, 1.0))[:, None]
            offs = t_row[:, None] * stride_o0 + h.to(gl.int64)[:, None] * stride_o1 + dv[None, :]
            gl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @gluon.jit
    def _producer(ka_desc, kb_desc, v_desc, ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty,
                  bt_row, num_bt_cols, oob_row, kv_col0, seq_len, tile_begin, n_tiles,
                  D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_SIZE: gl.constexpr, NUM_BUF: gl.constexpr):
        """K/V tiles as BLOCK_N // BLOCK_SIZE page boxes; the page ids of
        tile t + 1 are read while tile t's boxes are in flight."""
        PAGES: gl.constexpr = BLOCK_N // BLOCK_SIZE
        id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        pi = gl.arange(0, PAGES, layout=id_layout)
        col = tile_begin * PAGES + pi
        ok = (col < num_bt_cols) & (col * BLOCK_SIZE < seq_len)
        rows = gl.where(ok, gl.load(bt_row + col, mask=ok, other=0) * BLOCK_SIZE, oob_row)
        for t in range(0, n_tiles):
            slot = t % NUM_BUF
            phase = ((t // NUM_BUF) & 1) ^ 1  # a fresh barrier passes a wait for parity 1
            cur = rows
            # the next tile's page ids: their loads overlap this tile's boxes
            col = (tile_begin + t + 1) * PAGES + pi
            ok = (col < num_bt_cols) & (col * BLOCK_SIZE < seq_len) & (t + 1 < n_tiles)
            rows = gl.where(ok, gl.load(bt_row + col, mask=ok, other=0) * BLOCK_SIZE, oob_row)
            load_kv_tile(ka_desc, kb_desc, v_desc, ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty, slot, phase,
                         cur, pi, kv_col0, D1, D2, DV, BLOCK_N, BLOCK_SIZE)

    @gluon.jit
    def _decode_kernel(
        ka_desc, kb_desc, v_desc,  # cache as [num_blocks * BLOCK_SIZE, Hkv * (DQK + DV)]: page boxes
        q_ptr,  # [T, H, DQK]
        out_ptr,  # [T, H, DV]
        part_out_ptr,  # [T, H, num_splits, DV] fp32 (SPLIT)
        part_max_ptr,  # [T, H, num_splits] fp32 (SPLIT)
        part_sum_ptr,  # [T, H, num_splits] fp32 (SPLIT)
        qsl_ptr,  # [S + 1] int32
        seq_lens_ptr,  # [S] int32
        bt_ptr,  # [S, num_bt_cols] int32
        sinks_ptr,  # [H] fp32 (USE_SINKS, unsplit)
        num_seqs, num_heads, num_bt_cols, stride_bt0, oob_row, num_splits, q_len_lo, q_len_hi, qk_scale,
        stride_q0, stride_q1, stride_o0, stride_o1,
        G: gl.constexpr, QT: gl.constexpr, DQK: gl.constexpr, D1: gl.constexpr, D2: gl.constexpr,
        DV: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
        NUM_BUF: gl.constexpr, SPLIT: gl.constexpr, USE_SINKS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
    ):
        # grid (Hkv, T // QT + S, num_splits); query tile -> sequence by binary search
        kvh = gl.program_id(0)
        pid_q = gl.program_id(1)
        split = gl.program_id(2)
        s = tile_owner(qsl_ptr, num_seqs, pid_q, QT)
        q_start = gl.load(qsl_ptr + s)
        q_len = gl.load(qsl_ptr + s + 1) - q_start
        seq_len = gl.load(seq_lens_ptr + s)  # s is a valid index: load it with the query bounds
        q0 = (pid_q - (q_start // QT + s)) * QT
        if (q0 < q_len) & (q_len >= q_len_lo) & (q_len <= q_len_hi):
            ctx = seq_len - q_len
            tile_hi = (ctx + gl.minimum(q0 + QT, q_len) + BLOCK_N - 1) // BLOCK_N
            per_split = (tile_hi + num_splits - 1) // num_splits
            tile_begin = split * per_split
            n_tiles = gl.minimum(tile_begin + per_split, tile_hi) - tile_begin
            if n_tiles > 0:
                ka_s = gl.allocate_shared_memory(ka_desc.dtype, [NUM_BUF, BLOCK_N, D1], ka_desc.layout)
                kb_s = gl.allocate_shared_memory(kb_desc.dtype, [NUM_BUF, BLOCK_N, D2], kb_desc.layout)
                v_s = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, BLOCK_N, DV], v_desc.layout)
                k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
                v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
                k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
                v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
                for i in gl.static_range(NUM_BUF):
                    mbarrier.init(k_ready.index(i), count=1)
                    mbarrier.init(v_ready.index(i), count=1)
                    mbarrier.init(k_empty.index(i), count=1)
                    mbarrier.init(v_empty.index(i), count=1)
                bt_row = bt_ptr + s.to(gl.int64) * stride_bt0
                kv_col0 = kvh * (DQK + DV)
                gl.warp_specialize([
                    (_consumer, (ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty, q_ptr, out_ptr, part_out_ptr,
                                 part_max_ptr, part_sum_ptr, sinks_ptr, q_start, q0, q_len, seq_len, ctx, kvh,
                                 tile_begin, n_tiles, split, num_splits, num_heads, qk_scale, stride_q0, stride_q1,
                                 stride_o0, stride_o1, G, QT, BLOCK_M, BLOCK_N, D1, D2, DV, NUM_BUF, SPLIT,
                                 USE_SINKS)),
                    (_producer, (ka_desc, kb_desc, v_desc, ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty,
                                 bt_row, num_bt_cols, oob_row, kv_col0, seq_len, tile_begin, n_tiles, D1, D2, DV,
                                 BLOCK_N, BLOCK_SIZE, NUM_BUF)),
                ], [1], [PRODUCER_REGS])
            else:
                if SPLIT:  # an empty split: a partial that weighs nothing in the reduce
                    e_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
                    r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, e_layout))
                    row_ok = (r < QT * G) & (q0 + r // G < q_len)
                    slot_o = ((q_start + q0 + r // G).to(gl.int64) * num_heads + kvh * G + r % G) * num_splits + split
                    gl.store(part_max_ptr + slot_o, gl.full([BLOCK_M], float("-inf"), gl.float32,
                                                            gl.SliceLayout(1, e_layout)), mask=row_ok)
                    gl.store(part_sum_ptr + slot_o, gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, e_layout)),
                             mask=row_ok)
                    dv = gl.arange(0, DV, layout=gl.SliceLayout(0, e_layout))
                    gl.store(part_out_ptr + slot_o[:, None] * DV + dv[None, :],
                             gl.zeros([BLOCK_M, DV], gl.float32, e_layout), mask=row_ok[:, None])


def decode(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
           block_table: torch.Tensor, out: torch.Tensor, *, scale: float, sinks: torch.Tensor | None,
           num_splits: int, query_tokens: int, partials: tuple | None,
           q_len_range: tuple[int, int] = (0, 2**31 - 1)) -> None:
    """Launch the decode kernel (the caller checked
    :func:`unsupported_reasons`). ``num_splits > 1`` writes ``partials``
    (``(part_out, part_max, part_sum)`` of the workspace) for the reduce
    kernel, which the caller launches; 1 writes ``out``. ``query_tokens``:
    from :func:`query_tokens_per_tile`. No allocation, no host sync."""
    T, H, Dqk = query.shape
    num_blocks, block_size, Hkv, width = kv_cache.shape
    d1, d2 = _pg.SERVED_SHAPES[(Dqk, width - Dqk)]
    S = seq_lens.shape[0]
    block_n = tile_keys(block_size)
    split = num_splits > 1
    part_out, part_max, part_sum = partials if split else (out, out, out)
    grid = (Hkv, T // query_tokens + S, num_splits)
    _decode_kernel[grid](
        *_pg.kv_descriptors(kv_cache, Dqk), query, out, part_out, part_max, part_sum, query_start_loc, seq_lens,
        block_table, sinks if sinks is not None else seq_lens,
        S, H, block_table.shape[1], block_table.stride(0), num_blocks * block_size, num_splits,
        q_len_range[0], q_len_range[1], float(scale * LOG2E),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        G=H // Hkv, QT=query_tokens, DQK=Dqk, D1=d1, D2=d2, DV=width - Dqk, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, NUM_BUF=ring_slots(block_size), SPLIT=split, USE_SINKS=sinks is not None and not split,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=4,
    )


def build_offline(block_size: int, split: bool, use_sinks: bool = False, dtype: torch.dtype = torch.bfloat16,
                  query_tokens: int = 1):
    """Compile the kernel for sm_90 on any machine (no GPU needed), for
    tests and perf/ tools (see :func:`.prefill_gluon.build_offline`)."""
    constexprs = dict(G=8, QT=query_tokens, DQK=192, D1=128, D2=64, DV=128, BLOCK_M=BLOCK_M,
                      BLOCK_N=tile_keys(block_size), BLOCK_SIZE=block_size, NUM_BUF=ring_slots(block_size), SPLIT=split,
                      USE_SINKS=use_sinks, PRODUCER_REGS=PRODUCER_REGS)
    elem = "bf16" if dtype == torch.bfloat16 else "fp16"
    types = dict(q_ptr=f"*{elem}", out_ptr=f"*{elem}", part_out_ptr="*fp32", part_max_ptr="*fp32",
                 part_sum_ptr="*fp32", qsl_ptr="*i32", seq_lens_ptr="*i32", bt_ptr="*i32", sinks_ptr="*fp32",
                 qk_scale="fp32")
    cache = torch.empty(32, block_size, 2, 320, dtype=dtype)
    return _pg.compile_offline(_decode_kernel, constexprs, types, _pg.kv_descriptors(cache, 192))
