"""Experiment 2: prefill with two-phase loops (no masks off the diagonal),
heavy-tiles-first grid order, K loaded [N, D] + trans; decode timing split
into its two kernels and a single-launch variant whose last split reduces."""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from exp_kernels import _decode_reduce, _decode_split, bench, ceilings, make, ref


@triton.jit
def _tile(acc, m, lsum, qa, qb, kv_ptr, bt_row, offs_m_pos, n0, kv_end, kvh, s_kb, s_ks, s_kh, scale_log2,
          DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
          MASK: tl.constexpr, KT: tl.constexpr):
    offs = n0 + tl.arange(0, BLOCK_N)
    if MASK:
        kmask = offs < kv_end
        blk = tl.load(bt_row + offs // BS, mask=kmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs // BS).to(tl.int64)
    base = blk * s_kb + (offs % BS).to(tl.int64) * s_ks + kvh * s_kh
    if MASK:
        if KT:
            ka = tl.trans(tl.load(kv_ptr + base[:, None] + tl.arange(0, DA)[None, :], mask=kmask[:, None], other=0.0))
            kb = tl.trans(tl.load(kv_ptr + base[:, None] + DA + tl.arange(0, DB)[None, :], mask=kmask[:, None],
                                  other=0.0))
        else:
            ka = tl.load(kv_ptr + base[None, :] + tl.arange(0, DA)[:, None], mask=kmask[None, :], other=0.0)
            kb = tl.load(kv_ptr + base[None, :] + DA + tl.arange(0, DB)[:, None], mask=kmask[None, :], other=0.0)
        v = tl.load(kv_ptr + base[:, None] + (DA + DB) + tl.arange(0, DV)[None, :], mask=kmask[:, None], other=0.0)
    else:
        if KT:
            ka = tl.trans(tl.load(kv_ptr + base[:, None] + tl.arange(0, DA)[None, :]))
            kb = tl.trans(tl.load(kv_ptr + base[:, None] + DA + tl.arange(0, DB)[None, :]))
        else:
            ka = tl.load(kv_ptr + base[None, :] + tl.arange(0, DA)[:, None])
            kb = tl.load(kv_ptr + base[None, :] + DA + tl.arange(0, DB)[:, None])
        v = tl.load(kv_ptr + base[:, None] + (DA + DB) + tl.arange(0, DV)[None, :])
    s = tl.dot(qa, ka)
    s = tl.dot(qb, kb, s)
    s = s * scale_log2
    if MASK:
        s = tl.where((offs[None, :] <= offs_m_pos[:, None]) & kmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    lsum = lsum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, lsum


@triton.jit
def _prefill2(q_ptr, kv_ptr, bt_ptr, sl_ptr, qsl_ptr, out_ptr,
              s_qt, s_qh, s_kb, s_ks, s_kh, s_bt, s_ot, s_oh, scale_log2,
              H: tl.constexpr, G: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
              BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KT: tl.constexpr):
    h = tl.program_id(0)
    mt = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q0 = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q0
    m_start = mt * BLOCK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(sl_ptr + seq)
    ctx = seq_len - q_len
    kvh = (h // G).to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    mmask = offs_m < q_len
    qrow = q_ptr + (q0 + offs_m)[:, None].to(tl.int64) * s_qt + h * s_qh
    qa = tl.load(qrow + tl.arange(0, DA)[None, :], mask=mmask[:, None], other=0.0)
    qb = tl.load(qrow + DA + tl.arange(0, DB)[None, :], mask=mmask[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    pos = ctx + offs_m
    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    full_end = ((ctx + m_start) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(ctx + m_start + BLOCK_M, seq_len)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m, lsum = _tile(acc, m, lsum, qa, qb, kv_ptr, bt_row, pos, n0, kv_end, kvh, s_kb, s_ks, s_kh,
                             scale_log2, DA, DB, DV, BS, BLOCK_N, False, KT)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m, lsum = _tile(acc, m, lsum, qa, qb, kv_ptr, bt_row, pos, n0, kv_end, kvh, s_kb, s_ks, s_kh,
                             scale_log2, DA, DB, DV, BS, BLOCK_N, True, KT)
    o = acc / lsum[:, None]
    orow = out_ptr + (q0 + offs_m)[:, None].to(tl.int64) * s_ot + h * s_oh + tl.arange(0, DV)[None, :]
    tl.store(orow, o.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


@triton.jit
def _decode_fused(q_ptr, kv_ptr, bt_ptr, sl_ptr, po_ptr, pm_ptr, pl_ptr, cnt_ptr, out_ptr,
                  s_qt, s_qh, s_kb, s_ks, s_kh, s_bt, s_ot, s_oh, scale_log2,
                  H: tl.constexpr, Hkv: tl.constexpr, G: tl.constexpr, M_PAD: tl.constexpr, DA: tl.constexpr,
                  DB: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                  NSPLIT: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(sl_ptr + seq)
    per = tl.cdiv(tl.cdiv(seq_len, NSPLIT), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, seq_len)
    rows = tl.arange(0, M_PAD)
    rmask = rows < G
    heads = kvh * G + rows
    qrow = q_ptr + seq.to(tl.int64) * s_qt + heads[:, None].to(tl.int64) * s_qh
    qa = tl.load(qrow + tl.arange(0, DA)[None, :], mask=rmask[:, None], other=0.0)
    qb = tl.load(qrow + DA + tl.arange(0, DB)[None, :], mask=rmask[:, None], other=0.0)
    m = tl.full([M_PAD], float("-inf"), tl.float32)
    lsum = tl.zeros([M_PAD], tl.float32)
    acc = tl.zeros([M_PAD, DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        kmask = offs < end
        blk = tl.load(bt_ptr + seq.to(tl.int64) * s_bt + offs // BS, mask=kmask, other=0).to(tl.int64)
        base = blk * s_kb + (offs % BS).to(tl.int64) * s_ks + kvh.to(tl.int64) * s_kh
        ka = tl.load(kv_ptr + base[None, :] + tl.arange(0, DA)[:, None], mask=kmask[None, :], other=0.0)
        kb = tl.load(kv_ptr + base[None, :] + DA + tl.arange(0, DB)[:, None], mask=kmask[None, :], other=0.0)
        v = tl.load(kv_ptr + base[:, None] + (DA + DB) + tl.arange(0, DV)[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(qa, ka) + tl.dot(qb, kb)
        s = tl.where(kmask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        lsum = lsum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    pidx = (seq * H + heads).to(tl.int64) * NSPLIT + split
    tl.store(pm_ptr + pidx, m, mask=rmask)
    tl.store(pl_ptr + pidx, lsum, mask=rmask)
    tl.store(po_ptr + pidx[:, None] * DV + tl.arange(0, DV)[None, :], acc, mask=rmask[:, None])
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + seq * Hkv + kvh, 1, sem="acq_rel")
    if done == NSPLIT - 1:
        tl.debug_barrier()
        sp = tl.arange(0, NSPLIT)
        for r in range(G):
            base = (seq * H + kvh * G + r).to(tl.int64) * NSPLIT
            mm = tl.load(pm_ptr + base + sp, cache_modifier=".cg")
            ll = tl.load(pl_ptr + base + sp, cache_modifier=".cg")
            mx = tl.max(mm, 0)
            w = tl.where(mm > float("-inf"), tl.exp2(mm - mx), 0.0)
            a = tl.load(po_ptr + (base + sp)[:, None] * DV + tl.arange(0, DV)[None, :], cache_modifier=".cg")
            o = tl.sum(a * w[:, None], 0) / tl.sum(ll * w, 0)
            tl.store(out_ptr + seq.to(tl.int64) * s_ot + (kvh * G + r) * s_oh + tl.arange(0, DV),
                     o.to(out_ptr.dtype.element_ty))
        tl.atomic_xchg(cnt_ptr + seq * Hkv + kvh, 0)


def decode_parts(B, ctx, nsplit, bn, w, st, H=32, Hkv=4, fused=False):
    q, kv, bt, sl, qsl = make(B, 1, ctx)
    G = H // Hkv
    po = torch.empty(B * H * nsplit, 128, device="cuda", dtype=torch.float32)
    pm = torch.empty(B * H * nsplit, device="cuda", dtype=torch.float32)
    pl = torch.empty_like(pm)
    cnt = torch.zeros(B * Hkv, device="cuda", dtype=torch.int32)
    out = torch.empty(B, H, 128, device="cuda", dtype=torch.bfloat16)
    sc = 192 ** -0.5 * 1.4426950408889634
    common = (q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), kv.stride(2), bt.stride(0))

    def split_fn():
        _decode_split[(B, Hkv, nsplit)](q, kv, bt, sl, po, pm, pl, *common, sc, H=H, G=G, M_PAD=max(16, G), DA=128,
                                        DB=64, DV=128, BS=16, BLOCK_N=bn, NSPLIT=nsplit, num_warps=w, num_stages=st)

    def red_fn():
        _decode_reduce[(B, H)](po, pm, pl, out, out.stride(0), out.stride(1), H=H, DV=128, NSPLIT=nsplit, num_warps=4)

    def fused_fn():
        _decode_fused[(B, Hkv, nsplit)](q, kv, bt, sl, po, pm, pl, cnt, out, *common, out.stride(0), out.stride(1),
                                        sc, H=H, Hkv=Hkv, G=G, M_PAD=max(16, G), DA=128, DB=64, DV=128, BS=16,
                                        BLOCK_N=bn, NSPLIT=nsplit, num_warps=w, num_stages=st)
    nbytes = B * (ctx + 1) * Hkv * 320 * 2 + B * H * 320 * 2
    if fused:
        fused_fn()
        r = ref(q, kv, bt, sl, qsl, B, 1, ctx + 1, H, Hkv, 192)
        err = (out.float() - r).abs().max().item()
        ms = bench(fused_fn)
        fused_fn()
        err2 = (out.float() - r).abs().max().item()
        return ms, nbytes / ms / 1e6, (err, err2)
    split_fn()
    red_fn()
    t_split = bench(split_fn)
    t_red = bench(red_fn)

    def both():
        split_fn()
        red_fn()
    t_both = bench(both)
    return t_split, t_red, t_both, nbytes / t_both / 1e6


def prefill2(B, n, bm, bn, w, st, kt, H=32, Hkv=4):
    q, kv, bt, sl, qsl = make(B, n, 0)
    out = torch.empty(B * n, H, 128, device="cuda", dtype=torch.bfloat16)
    sc = 192 ** -0.5 * 1.4426950408889634

    def fn():
        _prefill2[(H, triton.cdiv(n, bm), B)](q, kv, bt, sl, qsl, out, q.stride(0), q.stride(1), kv.stride(0),
                                              kv.stride(1), kv.stride(2), bt.stride(0), out.stride(0), out.stride(1),
                                              sc, H=H, G=H // Hkv, DA=128, DB=64, DV=128, BS=16, BLOCK_M=bm,
                                              BLOCK_N=bn, KT=kt, num_warps=w, num_stages=st)
    fn()
    r = ref(q, kv, bt, sl, qsl, B, n, n, H, Hkv, 192) if B * n <= 8192 else None
    err = (out.float() - r).abs().max().item() if r is not None else None
    ms = bench(fn)
    flops = 2.0 * B * (n * (n + 1) / 2) * H * 320
    return ms, flops / ms / 1e9, err


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    bw, tf = ceilings()
    print(f"ceilings: copy {bw:.0f} GB/s, bf16 matmul {tf:.0f} TFLOP/s", flush=True)
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("all", "decode"):
        for B, ctx, splits in [(1, 32767, (32, 64, 128)), (16, 8191, (4, 8))]:
            for ns in splits:
                for bn, w, st in ((64, 4, 2), (128, 4, 3), (64, 4, 4)):
                    ts, tr, tb, gbs = decode_parts(B, ctx, ns, bn, w, st)
                    print(f"decode B={B} ns={ns} bn={bn} w={w} st={st}: split {ts * 1e3:.1f} us + reduce "
                          f"{tr * 1e3:.1f} us; both {tb * 1e3:.1f} us {gbs:.0f} GB/s ({gbs / bw:.0%})", flush=True)
                    ms, gbs, errs = decode_parts(B, ctx, ns, bn, w, st, fused=True)
                    print(f"   fused: {ms * 1e3:.1f} us {gbs:.0f} GB/s ({gbs / bw:.0%}) errs {errs}", flush=True)
    if which in ("all", "prefill"):
        for B, n in [(1, 8192), (4, 2048)]:
            for bm, bn, w, st, kt in [(128, 128, 8, 2, False), (128, 128, 8, 2, True), (128, 128, 8, 3, False),
                                      (128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 64, 8, 4, False),
                                      (128, 128, 8, 3, True), (256, 64, 8, 2, False), (128, 128, 4, 2, False)]:
                try:
                    ms, tfs, err = prefill2(B, n, bm, bn, w, st, kt)
                except Exception as e:  # noqa
                    print("fail", bm, bn, w, st, kt, str(e)[:100], flush=True)
                    continue
                print(f"prefill2 {B}x{n} BM={bm} BN={bn} w={w} st={st} KT={kt}: {ms:.3f} ms {tfs:.0f} TFLOP/s "
                      f"({tfs / tf:.0%}) err {err}", flush=True)
