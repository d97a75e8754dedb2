"""Experiment 21: a Gluon prefill kernel with explicit asynchronous wgmma.

exp20 (Triton's automatic Hopper warp specialization) compiled but hung on
the H100, and offline compiles of hand-reordered Triton loops (QK of the next
tile before this tile's softmax; PV of the previous tile after this tile's
QK) showed Triton 3.6 waits (``pendings = 0``) right after every QK/PV dot:
no Triton-level schedule overlaps softmax with the tensor cores inside one
program. Gluon (``triton.experimental.gluon``, shipped with Triton 3.6) lets
the kernel issue wgmma asynchronously and choose where to wait.

Schedule per KV tile t (FA3's intra-warpgroup overlap): softmax(t) runs
while PV(t-1) is on the tensor cores; then QK(t+1) and PV(t) are issued and
only QK(t+1) is waited for. K/V tiles come by TMA into a NUM_BUF-deep ring
(one mbarrier per slot for K, one for V); a slot is refilled once the PV
that read it has completed. 128 query tokens of one head per program, 8
warps, Dqk = 128 + 64, causal; mask only on tiles from the diagonal on.

Prediction: >= 75 % of the bf16 matmul ceiling on 1x8k (product 63-65 %),
> 60 % on 4x2k (product 53 %).

    python perf/exp21_gluon.py            # GPU: timings vs the product kernel
    python perf/exp21_gluon.py --compile  # no GPU: compile for sm_90, registers
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_init, \
    warpgroup_mma_wait


@gluon.jit
def _gl_prefill(
    qa_desc, qb_desc,  # query [T, H * DQK]: blocks [BLOCK_M, D1], [BLOCK_M, D2]
    ka_desc, kb_desc, v_desc,  # gathered K/V rows [rows, Hkv * (DQK + DV)]
    out_ptr, qsl_ptr, seq_lens_ptr, kv_start_ptr, tile_seq_ptr, tile_q0_ptr, qk_scale, stride_o0, stride_o1,
    G: gl.constexpr, DQK: gl.constexpr, D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr, num_warps: gl.constexpr,
):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)
    K_BYTES: gl.constexpr = BLOCK_N * (D1 + D2) * 2
    V_BYTES: gl.constexpr = BLOCK_N * DV * 2
    Q_BYTES: gl.constexpr = BLOCK_M * (D1 + D2) * 2

    pid_q = gl.num_programs(1) - 1 - gl.program_id(1)
    h = gl.program_id(0)
    kvh = h // G
    s = gl.load(tile_seq_ptr + pid_q)
    q0 = gl.load(tile_q0_ptr + pid_q)
    q_start = gl.load(qsl_ptr + s)
    q_len = gl.load(qsl_ptr + s + 1) - q_start
    seq_len = gl.load(seq_lens_ptr + s)
    ctx = seq_len - q_len
    kv_row0 = gl.load(kv_start_ptr + s)
    kv_col0 = kvh * (DQK + DV)
    q_last = gl.minimum(q0 + BLOCK_M, q_len)
    n_tiles = (ctx + q_last + BLOCK_N - 1) // BLOCK_N
    int_hi = (ctx + q0 + 1) // BLOCK_N  # tiles below this one need no mask

    qa_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D1], qa_desc.layout)
    qb_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D2], qb_desc.layout)
    ka_s = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, D1], ka_desc.layout)
    kb_s = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, D2], kb_desc.layout)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, DV], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    mbarrier.expect(q_bar, Q_BYTES)
    tma.async_copy_global_to_shared(qa_desc, [q_start + q0, h * DQK], q_bar, qa_s)
    tma.async_copy_global_to_shared(qb_desc, [q_start + q0, h * DQK + D1], q_bar, qb_s)
    for i in gl.static_range(NUM_BUF):
        first = i < n_tiles
        row = kv_row0 + i * BLOCK_N
        mbarrier.expect(k_bars.index(i), K_BYTES, pred=first)
        tma.async_copy_global_to_shared(ka_desc, [row, kv_col0], k_bars.index(i), ka_s.index(i), pred=first)
        tma.async_copy_global_to_shared(kb_desc, [row, kv_col0 + D1], k_bars.index(i), kb_s.index(i), pred=first)
        mbarrier.expect(v_bars.index(i), V_BYTES, pred=first)
        tma.async_copy_global_to_shared(v_desc, [row, kv_col0 + DQK], v_bars.index(i), v_s.index(i), pred=first)

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s_tok = warpgroup_mma(qa_s, ka_s.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_tok = warpgroup_mma(qb_s, kb_s.index(0).permute((1, 0)), s_tok, is_async=True)
    x = warpgroup_mma_wait(0, deps=[s_tok])

    pos = ctx + q0 + gl.arange(0, BLOCK_M, layout=s_rows)
    cn = gl.arange(0, BLOCK_N, layout=s_cols)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([BLOCK_M], gl.float32, s_rows)
    acc_tok = warpgroup_mma_init(gl.zeros([BLOCK_M, DV], gl.float32, o_layout))
    for t in range(0, n_tiles):
        slot = t % NUM_BUF
        # softmax(t): the tensor cores run PV(t-1) meanwhile
        if t >= int_hi:
            j = t * BLOCK_N + cn
            visible = (j[None, :] <= pos[:, None]) & (j < seq_len)[None, :]
            x = gl.where(visible, x, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(x, 1) * qk_scale)
        p = gl.exp2(x * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=[acc_tok])  # PV(t-1) done: its slot is free
        if t > 0:
            nt = t - 1 + NUM_BUF
            refill = nt < n_tiles
            pslot = (t - 1) % NUM_BUF
            row = kv_row0 + nt * BLOCK_N
            mbarrier.expect(k_bars.index(pslot), K_BYTES, pred=refill)
            tma.async_copy_global_to_shared(ka_desc, [row, kv_col0], k_bars.index(pslot), ka_s.index(pslot),
                                            pred=refill)
            tma.async_copy_global_to_shared(kb_desc, [row, kv_col0 + D1], k_bars.index(pslot), kb_s.index(pslot),
                                            pred=refill)
            mbarrier.expect(v_bars.index(pslot), V_BYTES, pred=refill)
            tma.async_copy_global_to_shared(v_desc, [row, kv_col0 + DQK], v_bars.index(pslot), v_s.index(pslot),
                                            pred=refill)
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        # QK(t+1) (on the last tile: QK(t) again, discarded), then PV(t)
        nxt = gl.minimum(t + 1, n_tiles - 1)
        nslot = nxt % NUM_BUF
        mbarrier.wait(k_bars.index(nslot), (nxt // NUM_BUF) & 1)
        s_tok = warpgroup_mma(qa_s, ka_s.index(nslot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(qb_s, kb_s.index(nslot).permute((1, 0)), s_tok, is_async=True)
        mbarrier.wait(v_bars.index(slot), (t // NUM_BUF) & 1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc_tok = warpgroup_mma(p_op, v_s.index(slot), acc, is_async=True)
        x = warpgroup_mma_wait(1, deps=[s_tok])  # QK(t+1) done, PV(t) may still run
    acc = warpgroup_mma_wait(0, deps=[acc_tok])
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    mbarrier.invalidate(q_bar)

    out = acc / gl.convert_layout(l_i, o_rows)[:, None]
    r = gl.arange(0, BLOCK_M, layout=o_rows)
    dv = gl.arange(0, DV, layout=o_cols)
    t_row = (q_start + q0 + r).to(gl.int64)
    offs = t_row[:, None] * stride_o0 + h.to(gl.int64) * stride_o1 + dv[None, :]
    gl.store(out_ptr + offs, out.to(gl.bfloat16), mask=(q0 + r < q_len)[:, None] & (dv < DV)[None, :])


CONFIGS = ((128, 128, 2, 8), (64, 64, 2, 4), (64, 32, 3, 4), (64, 64, 3, 4))
"""(BLOCK_M, BLOCK_N, NUM_BUF, num_warps) run on the GPU; 64-row programs with
<= ~110 KB of shared memory run two per SM (two independent warpgroups)."""


def _layout(shape):
    return gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)


def descriptors(q2, gathered, bm, bn, d1=128, d2=64, dv=128):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GD

    return (GD.from_tensor(q2, [bm, d1], _layout([bm, d1])), GD.from_tensor(q2, [bm, d2], _layout([bm, d2])),
            GD.from_tensor(gathered, [bn, d1], _layout([bn, d1])), GD.from_tensor(gathered, [bn, d2], _layout([bn, d2])),
            GD.from_tensor(gathered, [bn, dv], _layout([bn, dv])))


def compile_offline(bm=128, bn=64, nbuf=3, warps=8):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    q2 = torch.empty(1024, 32 * 192, dtype=torch.bfloat16)
    gth = torch.empty(1024, 4 * 320, dtype=torch.bfloat16)
    ds = descriptors(q2, gth, bm, bn)
    fn = _gl_prefill
    names = fn.arg_names
    cx = {"G": 8, "DQK": 192, "D1": 128, "D2": 64, "DV": 128, "BLOCK_M": bm, "BLOCK_N": bn, "NUM_BUF": nbuf,
          "num_warps": warps}
    types = dict(zip(["qa_desc", "qb_desc", "ka_desc", "kb_desc", "v_desc"], [mangle_type(d) for d in ds]))
    types.update({n: "*i32" for n in ("qsl_ptr", "seq_lens_ptr", "kv_start_ptr", "tile_seq_ptr", "tile_q0_ptr")})
    types.update({"out_ptr": "*bf16", "qk_scale": "fp32", "stride_o0": "i32", "stride_o1": "i32"})
    sig = {n: ("constexpr" if n in cx else types[n]) for n in names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in cx.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    sys.path.insert(0, "perf")
    from compile_sm90 import ptxas_usage

    ptx = k.asm["ptx"]
    print(f"bm={bm} bn={bn} nbuf={nbuf} warps={warps}: shared {k.metadata.shared} B, wgmma "
          f"{ptx.count('wgmma.mma_async')}, wait_group {ptx.count('wgmma.wait_group')}; {ptxas_usage(ptx)}", flush=True)
    return k


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    if a.compile:
        for cfg in CONFIGS:
            try:
                compile_offline(*cfg)
            except Exception as e:  # noqa: BLE001
                print(cfg, "FAILED", type(e).__name__, str(e)[:1500])
        return
    run_gpu()


def run_gpu():
    from diffkv.bench import SCENARIOS, build_batch, measure_ceilings, time_fn, workload
    from diffkv.triton.kernels import attention as tk

    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), triton.__version__, torch.__version__, flush=True)
    ceil = measure_ceilings(dev)
    print(ceil, flush=True)
    ws_buf = tk.Workspace.allocate(64, 32, 128, dev, kv_rows=32768, kv_row_width=4 * 320, kv_dtype=torch.bfloat16)
    for name in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part"):
        if name not in SCENARIOS:
            print("no scenario", name)
            continue
        s = SCENARIOS[name]
        b = build_batch(s, dev)
        c = b.common
        _, flops = workload(s)
        H, Dqk, Dv, Hkv = s.num_heads, s.head_size, s.head_size_v, s.num_kv_heads
        scale = Dqk ** -0.5

        def product():
            tk.paged_attention(b.query, b.kv_cache, c.query_start_loc, c.seq_lens, c.block_table_tensor, b.out,
                               scale=scale, max_query_len=c.max_query_len, max_seq_len=c.max_seq_len, workspace=ws_buf)
        product()
        torch.cuda.synchronize()
        ref = b.out.float().clone()
        ms, lo, hi = time_fn(product)
        print(f"{name:20s} product           {ms:.4f} ms [{lo:.4f}, {hi:.4f}]  {flops / ms / 1e9:.1f} TFLOP/s  "
              f"{100 * flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:.1f} % of matmul", flush=True)
        seq_lens = c.seq_lens.tolist()
        BS = s.block_size
        rows, starts, off = [], [], 0
        for i, L in enumerate(seq_lens):
            nb = math.ceil(L / BS)
            rows.append(b.kv_cache[c.block_table_tensor[i, :nb].long()].reshape(nb * BS, Hkv * (Dqk + Dv))[:L])
            starts.append(off)
            off += L
        # NaN rows after the last sequence: a read past it would poison the output
        gathered = torch.cat(rows + [torch.full((256, Hkv * (Dqk + Dv)), float("nan"), device=dev,
                                                dtype=b.kv_cache.dtype)], 0).contiguous()
        kv_start = torch.tensor(starts, dtype=torch.int32, device=dev)
        q2 = b.query.reshape(b.query.shape[0], H * Dqk)
        out = torch.empty_like(b.out)
        for bm, bn, nbuf, nw in CONFIGS:
            tseq, tq0 = [], []
            for i, q in enumerate(torch.diff(c.query_start_loc).tolist()):
                for q0 in range(0, q, bm):
                    tseq.append(i)
                    tq0.append(q0)
            tile_seq = torch.tensor(tseq, dtype=torch.int32, device=dev)
            tile_q0 = torch.tensor(tq0, dtype=torch.int32, device=dev)
            ds = descriptors(q2, gathered, bm, bn)

            def mine():
                _gl_prefill[(H, len(tseq))](*ds, out, c.query_start_loc, c.seq_lens, kv_start, tile_seq, tile_q0,
                                            scale * 1.4426950408889634, out.stride(0), out.stride(1), G=H // Hkv,
                                            DQK=Dqk, D1=128, D2=64, DV=Dv, BLOCK_M=bm, BLOCK_N=bn, NUM_BUF=nbuf,
                                            num_warps=nw)
            tag = f"gluon {bm}x{bn} buf{nbuf} w{nw}"
            try:
                out.fill_(float("nan"))
                mine()
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                ms, lo, hi = time_fn(mine)
                print(f"{name:20s} {tag:17s} {ms:.4f} ms [{lo:.4f}, {hi:.4f}]  {flops / ms / 1e9:.1f} TFLOP/s  "
                      f"{100 * flops / ms / 1e9 / ceil['bf16_matmul_TFLOPs']:.1f} % of matmul  max|diff| {err:.3g}",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name:20s} {tag:17s} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
