"""Experiment 32: a causal prefill of 64-row programs, two per SM.

Why: the product Gluon prefill (128 query rows, two consumer warpgroups, one
program per SM: 208 KB of shared memory, 12 warps) pays ~5 us of fixed cost
per program -- ring fill, first QK + softmax, last PV, the store, the next
program's launch -- with nothing else on the SM to hide it; at 4x2k (8.5
tiles of 128 keys per program) that is ~25 % of the time (perf/NOTES.md,
exp24-30). Persistent kernels lost twice (exp24, exp26).

Here a program holds 64 rows (one consumer warpgroup, Q in wgmma operand
registers: 48 registers) and streams 64-key tiles through a 2-slot ring
(80 KB) with the decode kernel's producer warp (diffkv/triton/kernels/
decode_gluon.py), so two programs fit one SM (shared memory 2 x ~97 KB;
registers: launched at ``maxnreg`` 128 per thread x 8 warps) and one's fixed
cost overlaps the other's tiles. Two row mappings:

* ``RH=1``: 64 query tokens of one head (grid: heads fastest, so the 8 heads
  of a KV head read the same tile at about the same time);
* ``RH=8``: 8 query tokens x the 8 heads of one KV head (GQA rows packed, as
  the decode).

Query tiles run heavy-first (``REVERSE``). The output goes through shared
memory and out as 16-byte pieces of whole rows (exp30).

Prediction: with the fixed cost hidden, 4x2k goes from ~0.32 ms to
<= 0.29 ms (>= 80 % of matmul); 1x8k stays within 5 % of the product.

    python perf/exp32_rows64.py            # A/B against the product, outputs compared

Outcome (H100, perf/logs/exp32_h100.log, matmul 688 TFLOP/s): falsified.
Outputs matched the product (max |d| 0.0039 bf16). Two 64-row programs per
SM: 4x2k 0.317 -> 0.347-0.352 ms, 1x8k 1.065 -> 1.21-1.27 ms, 2k chunk
0.200 -> 0.229-0.234 ms (RH=1 and RH=8 alike); one 64-row program per SM
with a 4-slot ring: 0.50 / 1.65 / 0.33 ms. Each 64-row program reads every
K/V tile for half the rows the product's 128-row program does.
"""

from __future__ import annotations

import sys

import torch

from diffkv.triton.kernels import decode_gluon as dg
from diffkv.triton.kernels import prefill_gluon as pg

if pg.AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from diffkv.triton.kernels.prefill_gluon import tile_owner

BLOCK_M = 64
BLOCK_N = 64
LOG2E = 1.4426950408889634

if pg.AVAILABLE:

    @gluon.jit
    def _consumer(ka_s, kb_s, v_s, o_s, k_ready, v_ready, k_empty, v_empty,
                  q_ptr, out_ptr, sinks_ptr, q_start, q0, q_len, seq_len, ctx, hg, n_tiles, qk_scale,
                  stride_q0, stride_q1, stride_o0, stride_o1,
                  RH: gl.constexpr, QT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr, NUM_BUF: gl.constexpr,
                  USE_SINKS: gl.constexpr):
        """Rows: token ``q0 + r // RH``, head ``hg * RH + r % RH``."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DV, 16])
        qa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

        rq = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        q_ok = q0 + rq // RH < q_len
        q_off = (q_start + q0 + rq // RH).to(gl.int64) * stride_q0 + (hg * RH + rq % RH).to(gl.int64) * stride_q1
        c1 = gl.arange(0, D1, layout=gl.SliceLayout(0, ld_layout))
        c2 = gl.arange(0, D2, layout=gl.SliceLayout(0, ld_layout))
        qa = gl.convert_layout(gl.load(q_ptr + q_off[:, None] + c1[None, :], mask=q_ok[:, None], other=0.0),
                               qa_layout)
        qb = gl.convert_layout(gl.load(q_ptr + q_off[:, None] + (D1 + c2)[None, :], mask=q_ok[:, None], other=0.0),
                               qa_layout)

        rs = gl.arange(0, BLOCK_M, layout=s_rows)
        pos = ctx + q0 + rs // RH  # keys j <= pos are visible; every row sees key 0
        cn = gl.arange(0, BLOCK_N, layout=s_cols)
        int_hi = (ctx + q0 + 1) // BLOCK_N
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(qa, ka_s.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(qb, kb_s.index(0).permute((1, 0)), s_tok, is_async=True)
        x = warpgroup_mma_wait(0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(0))
        if 0 >= int_hi:
            x = gl.where(cn[None, :] <= pos[:, None], x, float("-inf"))
        m_i = gl.max(x, 1) * qk_scale
        p = gl.exp2(x * qk_scale - m_i[:, None])
        l_i = gl.sum(p, 1)
        p_op = gl.convert_layout(p.to(v_s.dtype), p_layout)
        acc = gl.zeros([BLOCK_M, DV], gl.float32, o_layout)
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
            if t + 1 >= int_hi:
                j = (t + 1) * BLOCK_N + cn
                x = gl.where(j[None, :] <= pos[:, None], x, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(x, 1) * qk_scale)
            p = gl.exp2(x * qk_scale - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
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
        if n_tiles * BLOCK_N > seq_len:
            # rows past the sequence may hold NaN: zero them before PV reads them
            for i in gl.static_range(BLOCK_N // 32):
                rows = t * BLOCK_N + i * 32 + gl.arange(0, 32, layout=gl.SliceLayout(1, ld_layout))
                chunk = v_tile.slice(i * 32, 32)
                v_vals = chunk.load(ld_layout)
                chunk.store(gl.where((rows < seq_len)[:, None], v_vals, gl.zeros_like(v_vals)))
            fence_async_shared()
            gl.thread_barrier()
        acc_tok = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc_tok])
        mbarrier.arrive(v_empty.index(slot))

        if USE_SINKS:
            ro = gl.arange(0, BLOCK_M, layout=o_rows)
            z = gl.load(sinks_ptr + hg * RH + ro % RH) * 1.4426950408889634
            m_o = gl.convert_layout(m_i, o_rows)
            m_f = gl.maximum(m_o, z)
            corr = gl.exp2(m_o - m_f)
            l_o = gl.convert_layout(l_i, o_rows) * corr + gl.exp2(z - m_f)
            out = acc * (corr / l_o)[:, None]
        else:
            out = acc * gl.convert_layout(1.0 / l_i, o_rows)[:, None]
        o_s.store(out.to(o_s.dtype))
        gl.thread_barrier()
        out_c = o_s.load(out_layout)
        r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        dv = gl.arange(0, DV, layout=gl.SliceLayout(0, out_layout))
        t_row = (q_start + q0 + r // RH).to(gl.int64)
        offs = t_row[:, None] * stride_o0 + (hg * RH + r % RH).to(gl.int64)[:, None] * stride_o1 + dv[None, :]
        gl.store(out_ptr + offs, out_c, mask=(q0 + r // RH < q_len)[:, None])

    @gluon.jit
    def _kernel(
        ka_desc, kb_desc, v_desc, q_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, sinks_ptr,
        num_seqs, num_bt_cols, stride_bt0, oob_row, q_len_lo, q_len_hi, qk_scale,
        stride_q0, stride_q1, stride_o0, stride_o1,
        G: gl.constexpr, RH: gl.constexpr, QT: gl.constexpr, DQK: gl.constexpr, D1: gl.constexpr,
        D2: gl.constexpr, DV: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_SIZE: gl.constexpr, NUM_BUF: gl.constexpr, USE_SINKS: gl.constexpr, REVERSE: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
    ):
        hg = gl.program_id(0)
        if REVERSE:
            pid_q = gl.num_programs(1) - 1 - gl.program_id(1)
        else:
            pid_q = gl.program_id(1)
        kvh = (hg * RH) // G
        s = tile_owner(qsl_ptr, num_seqs, pid_q, QT)
        q_start = gl.load(qsl_ptr + s)
        q_len = gl.load(qsl_ptr + s + 1) - q_start
        seq_len = gl.load(seq_lens_ptr + s)
        q0 = (pid_q - (q_start // QT + s)) * QT
        if (q0 < q_len) & (q_len >= q_len_lo) & (q_len <= q_len_hi):
            ctx = seq_len - q_len
            n_tiles = (ctx + gl.minimum(q0 + QT, q_len) + BLOCK_N - 1) // BLOCK_N
            ka_s = gl.allocate_shared_memory(ka_desc.dtype, [NUM_BUF, BLOCK_N, D1], ka_desc.layout)
            kb_s = gl.allocate_shared_memory(kb_desc.dtype, [NUM_BUF, BLOCK_N, D2], kb_desc.layout)
            v_s = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, BLOCK_N, DV], v_desc.layout)
            o_s = gl.allocate_shared_memory(v_desc.dtype, [BLOCK_M, DV],
                                            gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))
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
                (_consumer, (ka_s, kb_s, v_s, o_s, k_ready, v_ready, k_empty, v_empty, q_ptr, out_ptr, sinks_ptr,
                             q_start, q0, q_len, seq_len, ctx, hg, n_tiles, qk_scale, stride_q0, stride_q1,
                             stride_o0, stride_o1, RH, QT, BLOCK_M, BLOCK_N, D1, D2, DV, NUM_BUF, USE_SINKS)),
                (dg._producer, (ka_desc, kb_desc, v_desc, ka_s, kb_s, v_s, k_ready, v_ready, k_empty, v_empty,
                                bt_row, num_bt_cols, oob_row, kv_col0, seq_len, 0, n_tiles, D1, D2, DV,
                                BLOCK_N, BLOCK_SIZE, NUM_BUF)),
            ], [1], [PRODUCER_REGS])


def config(block_size: int, rh: int, num_buf: int, maxnreg: int | None, reverse: bool = True) -> dict:
    return dict(RH=rh, NUM_BUF=num_buf, MAXNREG=maxnreg, REVERSE=reverse, BLOCK_N=max(BLOCK_N, block_size))


def prefill(query, kv_cache, query_start_loc, seq_lens, block_table, out, *, scale, sinks, cfg: dict,
            q_len_range=(0, 2**31 - 1)):
    T, H, Dqk = query.shape
    num_blocks, block_size, Hkv, width = kv_cache.shape
    d1, d2 = pg.SERVED_SHAPES[(Dqk, width - Dqk)]
    S = seq_lens.shape[0]
    rh = cfg["RH"]
    qt = BLOCK_M // rh
    grid = (H // rh, T // qt + S)
    extra = {"maxnreg": cfg["MAXNREG"]} if cfg["MAXNREG"] else {}
    _kernel[grid](
        *pg.kv_descriptors(kv_cache, Dqk), query, out, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens,
        S, block_table.shape[1], block_table.stride(0), num_blocks * block_size, q_len_range[0], q_len_range[1],
        float(scale * LOG2E), query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        G=H // Hkv, RH=rh, QT=qt, DQK=Dqk, D1=d1, D2=d2, DV=width - Dqk, BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_SIZE=block_size, NUM_BUF=cfg["NUM_BUF"], USE_SINKS=sinks is not None, REVERSE=cfg["REVERSE"],
        PRODUCER_REGS=40, num_warps=4, **extra,
    )
    return out


def build_offline(cfg: dict, block_size: int = 16, use_sinks: bool = False):
    """sm_90 compile on any machine (ptxas -v via perf/compile_sm90.py-like checks)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    cache = torch.empty(32, block_size, 2, 320, dtype=torch.bfloat16)
    descs = pg.kv_descriptors(cache, 192)
    rh = cfg["RH"]
    constexprs = dict(G=8, RH=rh, QT=BLOCK_M // rh, DQK=192, D1=128, D2=64, DV=128, BLOCK_M=BLOCK_M,
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_SIZE=block_size, NUM_BUF=cfg["NUM_BUF"], USE_SINKS=use_sinks,
                      REVERSE=cfg["REVERSE"], PRODUCER_REGS=40)
    types = dict(q_ptr="*bf16", out_ptr="*bf16", qsl_ptr="*i32", seq_lens_ptr="*i32", bt_ptr="*i32",
                 sinks_ptr="*fp32", qk_scale="fp32")
    fn = _kernel
    names = [n for n in fn.arg_names if n.endswith("_desc")]
    all_types = dict(zip(names, [mangle_type(d) for d in descs]))
    all_types.update(types)
    signature = {n: "constexpr" if n in constexprs else all_types.get(n, "i32") for n in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=signature,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    opts = {"num_warps": 4}
    if cfg["MAXNREG"]:
        opts["maxnreg"] = cfg["MAXNREG"]
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


VARIANTS = {
    "rh1_buf2_r128": config(16, 1, 2, 128),
    "rh8_buf2_r128": config(16, 8, 2, 128),
    "rh1_buf4_1cta": config(16, 1, 4, None),
    "rh8_buf4_1cta": config(16, 8, 4, None),
}


def main():
    from diffkv.bench import SCENARIOS, as_graph, build_batch, measure_ceilings, run_backend, time_fn, workload

    dev = torch.device("cuda")
    names = sys.argv[1:] or list(VARIANTS)
    ceil = measure_ceilings(dev)
    print(torch.cuda.get_device_name(), {k: round(v, 1) for k, v in ceil.items()}, flush=True)
    for sname in ("prefill_4x2k", "prefill_1x8k", "mixed.prefill_part"):
        s = SCENARIOS[sname]
        b = build_batch(s, dev)
        _, flops = workload(s)
        md = b.common
        fn = run_backend(s, b, "triton")
        b.out.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        ref = b.out.float().clone()
        for rep in range(2):
            ms, lo, hi = time_fn(as_graph(fn) or fn)
            print(f"{sname:20s} {'product':16s} {ms:.4f} ms [{lo:.4f}, {hi:.4f}] "
                  f"{100 * flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:.1f} % of matmul", flush=True)
        qsl = md.query_start_loc.to(dev)
        sl = md.seq_lens.to(dev)
        bt = md.block_table_tensor.to(dev)
        scale = s.head_size**-0.5
        for name in names:
            cfg = VARIANTS[name]

            def run(cfg=cfg):
                prefill(b.query, b.kv_cache, qsl, sl, bt, b.out, scale=scale, sinks=b.sinks, cfg=cfg)

            try:
                b.out.fill_(float("nan"))
                run()
                torch.cuda.synchronize()
                d = (b.out.float() - ref).abs().max().item()
                for rep in range(2):
                    ms, lo, hi = time_fn(as_graph(run) or run)
                    print(f"{sname:20s} {name:16s} {ms:.4f} ms [{lo:.4f}, {hi:.4f}] "
                          f"{100 * flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:.1f} % of matmul  "
                          f"max|d| {d:.3g}", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                print(f"{sname:20s} {name:16s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
