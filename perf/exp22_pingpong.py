"""Experiment 22: FA3-style ping-pong prefill in Gluon.

exp21's single-partition Gluon kernel (async wgmma, softmax(t) overlapping
PV(t-1)) ran level with the product (1x8k 1.409-1.428 vs 1.429-1.458 ms):
both warpgroups of a 128-row tile wait for QK together, so the softmax never
overlaps QK, which is 60 % of the MMA work at Dqk=192, Dv=128.

Here the 128 query rows of a program are split between two consumer
warpgroups (warp_specialize partitions, 64 rows each) that take turns on the
tensor cores (two mbarriers pass the turn): while one runs softmax, the
other's QK(t+1) and PV(t) run. A 1-warp producer partition loads Q and the
K/V ring by TMA; a slot is freed when both consumers have finished PV on it
(an mbarrier with count 2).

Prediction: >= 75 % of the bf16 matmul ceiling on 1x8k, > 60 % on 4x2k.

    python perf/exp22_pingpong.py            # GPU (each case in a subprocess with a timeout)
    python perf/exp22_pingpong.py --compile  # no GPU: compile for sm_90
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_init, \
    warpgroup_mma_wait


@gluon.jit
def _consumer(c: gl.constexpr, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready, k_empty, v_empty, turn,
              out_ptr, q_start, q0, q_len, seq_len, ctx, n_tiles, qk_scale, h, stride_o0, stride_o1,
              HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr, NUM_BUF: gl.constexpr,
              PINGPONG: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)

    r0 = q0 + c * HALF_M  # first local query row of this warpgroup
    int_hi = (ctx + r0 + 1) // BLOCK_N
    qa = qa_s.index(c)
    qb = qb_s.index(c)
    zero_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bars.index(c), 0)
    mbarrier.wait(k_ready.index(0), 0)
    s_tok = warpgroup_mma(qa, ka_s.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_tok = warpgroup_mma(qb, kb_s.index(0).permute((1, 0)), s_tok, is_async=True)
    x = warpgroup_mma_wait(0, deps=[s_tok])
    mbarrier.arrive(k_empty.index(0))  # K of tile 0 read

    pos = ctx + r0 + gl.arange(0, HALF_M, layout=s_rows)
    cn = gl.arange(0, BLOCK_N, layout=s_cols)
    m_i = gl.full([HALF_M], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([HALF_M], gl.float32, s_rows)
    acc_tok = warpgroup_mma_init(gl.zeros([HALF_M, DV], gl.float32, o_layout))
    for t in range(0, n_tiles):
        slot = t % NUM_BUF
        if t >= int_hi:
            j = t * BLOCK_N + cn
            visible = (j[None, :] <= pos[:, None]) & (j < seq_len)[None, :]
            x = gl.where(visible, x, float("-inf"))
        # the first row of warpgroup 0 sees key 0, the rows of warpgroup 1 see
        # more: m stays finite from tile 0 on (causal from key 0)
        m_new = gl.maximum(m_i, gl.max(x, 1) * qk_scale)
        p = gl.exp2(x * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=[acc_tok])  # PV(t-1) done
        if t > 0:
            mbarrier.arrive(v_empty.index((t - 1) % NUM_BUF))  # V of tile t-1 read
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        nxt = gl.minimum(t + 1, n_tiles - 1)
        nslot = nxt % NUM_BUF
        mbarrier.wait(k_ready.index(nslot), (nxt // NUM_BUF) & 1)
        mbarrier.wait(v_ready.index(slot), (t // NUM_BUF) & 1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        if PINGPONG:
            mbarrier.wait(turn.index(c), t & 1)
        s_tok = warpgroup_mma(qa, ka_s.index(nslot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(qb, kb_s.index(nslot).permute((1, 0)), s_tok, is_async=True)
        acc_tok = warpgroup_mma(p_op, v_s.index(slot), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - c))
        x = warpgroup_mma_wait(1, deps=[s_tok])
        mbarrier.arrive(k_empty.index(nslot), pred=t + 1 < n_tiles)  # K of tile t+1 read
    acc = warpgroup_mma_wait(0, deps=[acc_tok])

    out = acc / gl.convert_layout(l_i, o_rows)[:, None]
    r = gl.arange(0, HALF_M, layout=o_rows)
    dv = gl.arange(0, DV, layout=o_cols)
    t_row = (q_start + r0 + r).to(gl.int64)
    offs = t_row[:, None] * stride_o0 + h.to(gl.int64) * stride_o1 + dv[None, :]
    gl.store(out_ptr + offs, out.to(gl.bfloat16), mask=(r0 + r < q_len)[:, None] & (dv < DV)[None, :])


@gluon.jit
def _producer(qa_desc, qb_desc, ka_desc, kb_desc, v_desc, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready,
              k_empty, v_empty, q_row, q_col, kv_row0, kv_col0, n_tiles, HALF_M: gl.constexpr, D1: gl.constexpr,
              D2: gl.constexpr, DV: gl.constexpr, BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr):
    for c in gl.static_range(2):
        mbarrier.expect(q_bars.index(c), HALF_M * (D1 + D2) * 2)
        tma.async_copy_global_to_shared(qa_desc, [q_row + c * HALF_M, q_col], q_bars.index(c), qa_s.index(c))
        tma.async_copy_global_to_shared(qb_desc, [q_row + c * HALF_M, q_col + D1], q_bars.index(c), qb_s.index(c))
    for t in range(0, n_tiles):
        slot = t % NUM_BUF
        row = kv_row0 + t * BLOCK_N
        mbarrier.wait(k_empty.index(slot), ((t // NUM_BUF) & 1) ^ 1)
        mbarrier.expect(k_ready.index(slot), BLOCK_N * (D1 + D2) * 2)
        tma.async_copy_global_to_shared(ka_desc, [row, kv_col0], k_ready.index(slot), ka_s.index(slot))
        tma.async_copy_global_to_shared(kb_desc, [row, kv_col0 + D1], k_ready.index(slot), kb_s.index(slot))
        mbarrier.wait(v_empty.index(slot), ((t // NUM_BUF) & 1) ^ 1)
        mbarrier.expect(v_ready.index(slot), BLOCK_N * DV * 2)
        tma.async_copy_global_to_shared(v_desc, [row, kv_col0 + D1 + D2], v_ready.index(slot), v_s.index(slot))


@gluon.jit
def _pp_prefill(
    qa_desc, qb_desc, ka_desc, kb_desc, v_desc,
    out_ptr, qsl_ptr, seq_lens_ptr, kv_start_ptr, tile_seq_ptr, tile_q0_ptr, qk_scale, stride_o0, stride_o1,
    G: gl.constexpr, DQK: gl.constexpr, D1: gl.constexpr, D2: gl.constexpr, DV: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr, PINGPONG: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    HALF_M: gl.constexpr = BLOCK_M // 2
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
    n_tiles = (ctx + gl.minimum(q0 + BLOCK_M, q_len) + BLOCK_N - 1) // BLOCK_N

    qa_s = gl.allocate_shared_memory(gl.bfloat16, [2, HALF_M, D1], qa_desc.layout)
    qb_s = gl.allocate_shared_memory(gl.bfloat16, [2, HALF_M, D2], qb_desc.layout)
    ka_s = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, D1], ka_desc.layout)
    kb_s = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, D2], kb_desc.layout)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, DV], v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.arrive(turn.index(0))  # warpgroup 0 takes the tensor cores first

    gl.warp_specialize([
        (_consumer, (0, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready, k_empty, v_empty, turn, out_ptr, q_start, q0,
                     q_len, seq_len, ctx, n_tiles, qk_scale, h, stride_o0, stride_o1, HALF_M, BLOCK_N, DV, NUM_BUF,
                     PINGPONG)),
        (_consumer, (1, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready, k_empty, v_empty, turn, out_ptr, q_start, q0,
                     q_len, seq_len, ctx, n_tiles, qk_scale, h, stride_o0, stride_o1, HALF_M, BLOCK_N, DV, NUM_BUF,
                     PINGPONG)),
        (_producer, (qa_desc, qb_desc, ka_desc, kb_desc, v_desc, qa_s, qb_s, ka_s, kb_s, v_s, q_bars, k_ready, v_ready,
                     k_empty, v_empty, q_start + q0, h * DQK, kv_row0, kv_col0, n_tiles, HALF_M, D1, D2, DV, BLOCK_N,
                     NUM_BUF)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _layout(shape):
    return gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)


def descriptors(q2, gathered, bm, bn, d1=128, d2=64, dv=128):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GD

    hm = bm // 2
    return (GD.from_tensor(q2, [hm, d1], _layout([hm, d1])), GD.from_tensor(q2, [hm, d2], _layout([hm, d2])),
            GD.from_tensor(gathered, [bn, d1], _layout([bn, d1])), GD.from_tensor(gathered, [bn, d2], _layout([bn, d2])),
            GD.from_tensor(gathered, [bn, dv], _layout([bn, dv])))


CONFIGS = ((128, 128, 2, 1, 240, 24), (128, 128, 2, 0, 240, 24), (128, 64, 4, 0, 192, 24))
"""(BLOCK_M, BLOCK_N, NUM_BUF, PINGPONG, consumer regs, producer regs)."""


def compile_offline(bm, bn, nbuf, pp, creg, preg):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    q2 = torch.empty(1024, 32 * 192, dtype=torch.bfloat16)
    gth = torch.empty(1024, 4 * 320, dtype=torch.bfloat16)
    ds = descriptors(q2, gth, bm, bn)
    fn = _pp_prefill
    names = fn.arg_names
    cx = {"G": 8, "DQK": 192, "D1": 128, "D2": 64, "DV": 128, "BLOCK_M": bm, "BLOCK_N": bn, "NUM_BUF": nbuf,
          "PINGPONG": bool(pp), "CONSUMER_REGS": creg, "PRODUCER_REGS": preg}
    types = dict(zip(["qa_desc", "qb_desc", "ka_desc", "kb_desc", "v_desc"], [mangle_type(d) for d in ds]))
    types.update({n: "*i32" for n in ("qsl_ptr", "seq_lens_ptr", "kv_start_ptr", "tile_seq_ptr", "tile_q0_ptr")})
    types.update({"out_ptr": "*bf16", "qk_scale": "fp32", "stride_o0": "i32", "stride_o1": "i32"})
    sig = {n: ("constexpr" if n in cx else types[n]) for n in names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in cx.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    sys.path.insert(0, "perf")
    from compile_sm90 import ptxas_usage

    ptx = k.asm["ptx"]
    print(f"bm={bm} bn={bn} nbuf={nbuf} pp={pp}: shared {k.metadata.shared} B, wgmma {ptx.count('wgmma.mma_async')}, "
          f"setmaxnreg {ptx.count('setmaxnreg')}; {ptxas_usage(ptx)}", flush=True)
    return k


def run_case(cfg):
    from diffkv.bench import SCENARIOS, build_batch, measure_ceilings, time_fn, workload
    from diffkv.triton.kernels import attention as tk

    bm, bn, nbuf, pp, creg, preg = cfg
    dev = torch.device("cuda")
    ceil = measure_ceilings(dev)
    print(torch.cuda.get_device_name(), ceil, flush=True)
    ws_buf = tk.Workspace.allocate(64, 32, 128, dev, kv_rows=32768, kv_row_width=4 * 320, kv_dtype=torch.bfloat16)
    for name in ("prefill_1x8k", "prefill_4x2k", "mixed.prefill_part"):
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
        pct = lambda ms: 100 * flops / ms / 1e9 / ceil["bf16_matmul_TFLOPs"]  # noqa: E731
        print(f"{name:20s} product        {ms:.4f} ms [{lo:.4f}, {hi:.4f}]  {pct(ms):.1f} % of matmul", flush=True)
        seq_lens = c.seq_lens.tolist()
        rows, starts, off = [], [], 0
        for i, L in enumerate(seq_lens):
            nb = math.ceil(L / s.block_size)
            rows.append(b.kv_cache[c.block_table_tensor[i, :nb].long()].reshape(nb * s.block_size, -1)[:L])
            starts.append(off)
            off += L
        gathered = torch.cat(rows + [torch.full((256, Hkv * (Dqk + Dv)), float("nan"), device=dev,
                                                dtype=b.kv_cache.dtype)], 0).contiguous()
        kv_start = torch.tensor(starts, dtype=torch.int32, device=dev)
        q2 = b.query.reshape(b.query.shape[0], H * Dqk)
        out = torch.empty_like(b.out)
        tseq, tq0 = [], []
        for i, q in enumerate(torch.diff(c.query_start_loc).tolist()):
            for q0 in range(0, q, bm):
                tseq.append(i)
                tq0.append(q0)
        tile_seq = torch.tensor(tseq, dtype=torch.int32, device=dev)
        tile_q0 = torch.tensor(tq0, dtype=torch.int32, device=dev)
        ds = descriptors(q2, gathered, bm, bn)

        def mine():
            _pp_prefill[(H, len(tseq))](*ds, out, c.query_start_loc, c.seq_lens, kv_start, tile_seq, tile_q0,
                                        scale * 1.4426950408889634, out.stride(0), out.stride(1), G=H // Hkv,
                                        DQK=Dqk, D1=128, D2=64, DV=Dv, BLOCK_M=bm, BLOCK_N=bn, NUM_BUF=nbuf,
                                        PINGPONG=bool(pp), CONSUMER_REGS=creg, PRODUCER_REGS=preg, num_warps=4)
        out.fill_(float("nan"))
        mine()
        torch.cuda.synchronize()
        err = (out.float() - ref).abs().max().item()
        ms, lo, hi = time_fn(mine)
        print(f"{name:20s} pp {cfg}  {ms:.4f} ms [{lo:.4f}, {hi:.4f}]  {pct(ms):.1f} % of matmul  max|diff| {err:.3g}",
              flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true")
    p.add_argument("--one", type=int, help="run CONFIGS[i] in this process")
    p.add_argument("--timeout", type=int, default=60)
    a = p.parse_args()
    if a.compile:
        for cfg in CONFIGS:
            try:
                compile_offline(*cfg)
            except Exception as e:  # noqa: BLE001
                print(cfg, "FAILED", type(e).__name__, str(e)[:2000])
        return
    if a.one is not None:
        run_case(CONFIGS[a.one])
        return
    for i, cfg in enumerate(CONFIGS):  # a hang is a finding, not the end of the run
        try:
            r = subprocess.run([sys.executable, __file__, "--one", str(i)], capture_output=True, text=True,
                               timeout=a.timeout)
            lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
            print(f"[{cfg}] rc={r.returncode}", *lines[-6:], sep="\n  ", flush=True)
        except subprocess.TimeoutExpired:
            print(f"[{cfg}] TIMEOUT after {a.timeout} s (hang)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
