"""Experiment 3 (decode): where does the split kernel lose bandwidth?
Variants: tile size / warps / stages, K loaded [N, D] + trans, block ids of the
next tile prefetched by hand, an identity block table (contiguous pages),
and a reduce kernel parallel over Dv chunks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from exp_kernels import bench, ceilings, make, ref


@triton.jit
def _split3(q_ptr, kv_ptr, bt_ptr, sl_ptr, po_ptr, pm_ptr, pl_ptr,
            s_qt, s_qh, s_kb, s_ks, s_kh, s_bt, scale_log2,
            H: tl.constexpr, G: tl.constexpr, M_PAD: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
            DV: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, KT: tl.constexpr,
            STAGES: tl.constexpr):
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
    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    kv_head = kv_ptr + kvh.to(tl.int64) * s_kh
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs = n0 + tl.arange(0, BLOCK_N)
        kmask = offs < end
        blk = tl.load(bt_row + offs // BS, mask=kmask, other=0).to(tl.int64)
        base = blk * s_kb + (offs % BS).to(tl.int64) * s_ks
        if KT:
            ka = tl.trans(tl.load(kv_head + base[:, None] + tl.arange(0, DA)[None, :], mask=kmask[:, None], other=0.0))
            kb = tl.trans(tl.load(kv_head + base[:, None] + DA + tl.arange(0, DB)[None, :], mask=kmask[:, None],
                                  other=0.0))
        else:
            ka = tl.load(kv_head + base[None, :] + tl.arange(0, DA)[:, None], mask=kmask[None, :], other=0.0)
            kb = tl.load(kv_head + base[None, :] + DA + tl.arange(0, DB)[:, None], mask=kmask[None, :], other=0.0)
        v = tl.load(kv_head + base[:, None] + (DA + DB) + tl.arange(0, DV)[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(qa, ka)
        s = tl.dot(qb, kb, s)
        s = tl.where(kmask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        lsum = lsum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m = m_new
    pidx = (seq * H + heads).to(tl.int64) * NSPLIT + split
    tl.store(pm_ptr + pidx, m, mask=rmask)
    tl.store(pl_ptr + pidx, lsum, mask=rmask)
    tl.store(po_ptr + pidx[:, None] * DV + tl.arange(0, DV)[None, :], acc, mask=rmask[:, None])


@triton.jit
def _reduce3(po_ptr, pm_ptr, pl_ptr, out_ptr, s_ot, s_oh, H: tl.constexpr, DV: tl.constexpr, DCH: tl.constexpr,
             NSPLIT: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    sp = tl.arange(0, NSPLIT)
    base = (t * H + h).to(tl.int64) * NSPLIT
    m = tl.load(pm_ptr + base + sp)
    lsum = tl.load(pl_ptr + base + sp)
    mx = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - mx), 0.0)
    d = c * DCH + tl.arange(0, DCH)
    acc = tl.load(po_ptr + (base + sp)[:, None] * DV + d[None, :])
    o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(out_ptr + t.to(tl.int64) * s_ot + h * s_oh + d, o.to(out_ptr.dtype.element_ty))


def run(B, ctx, ns, bn, w, st, kt, identity=False, dch=32, H=32, Hkv=4):
    q, kv, bt, sl, qsl = make(B, 1, ctx)
    if identity:
        nb = bt.shape[1]
        bt = torch.arange(B * nb, device="cuda", dtype=torch.int32).view(B, nb)
    G = H // Hkv
    po = torch.empty(B * H * ns, 128, device="cuda", dtype=torch.float32)
    pm = torch.empty(B * H * ns, device="cuda", dtype=torch.float32)
    pl = torch.empty_like(pm)
    out = torch.empty(B, H, 128, device="cuda", dtype=torch.bfloat16)
    sc = 192 ** -0.5 * 1.4426950408889634

    def sfn():
        _split3[(B, Hkv, ns)](q, kv, bt, sl, po, pm, pl, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
                              kv.stride(2), bt.stride(0), sc, H=H, G=G, M_PAD=max(16, G), DA=128, DB=64, DV=128,
                              BS=16, BLOCK_N=bn, NSPLIT=ns, KT=kt, STAGES=st, num_warps=w)

    def rfn():
        _reduce3[(B, H, 128 // dch)](po, pm, pl, out, out.stride(0), out.stride(1), H=H, DV=128, DCH=dch, NSPLIT=ns,
                                     num_warps=1 if dch <= 32 else 4)

    def both():
        sfn()
        rfn()
    both()
    r = ref(q, kv, bt, sl, qsl, B, 1, ctx + 1, H, Hkv, 192)
    err = (out.float() - r).abs().max().item()
    nbytes = B * (ctx + 1) * Hkv * 320 * 2 + B * H * 320 * 2
    ts, tr, tb = bench(sfn), bench(rfn), bench(both)
    return ts, tr, tb, nbytes / tb / 1e6, err


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    bw, tf = ceilings()
    print(f"ceilings: copy {bw:.0f} GB/s, bf16 matmul {tf:.0f} TFLOP/s", flush=True)
    configs = [(64, 128, 4, 3, False), (64, 128, 4, 3, True), (64, 128, 8, 3, True), (32, 256, 8, 3, True),
               (64, 64, 4, 4, True), (128, 64, 4, 3, True), (64, 128, 4, 4, True), (32, 256, 8, 2, True)]
    for B, ctx in [(1, 32767)]:
        for ns, bn, w, st, kt in configs:
            for ident in (False, True):
                try:
                    ts, tr, tb, gbs, err = run(B, ctx, ns, bn, w, st, kt, ident)
                except Exception as e:  # noqa
                    print("fail", ns, bn, w, st, kt, str(e)[:120], flush=True)
                    continue
                print(f"B={B} ns={ns} bn={bn} w={w} st={st} KT={kt} ident={ident}: split {ts * 1e3:.1f} + red "
                      f"{tr * 1e3:.1f} = {tb * 1e3:.1f} us, {gbs:.0f} GB/s ({gbs / bw:.0%}) err {err:.2g}", flush=True)
    for B, ctx, ns in [(16, 8191, 4), (16, 8191, 8), (64, 4095, 1), (64, 4095, 2), (256, 2047, 1)]:
        for bn, w, st, kt in [(128, 4, 3, True), (64, 4, 3, True), (128, 8, 3, True), (64, 4, 4, True)]:
            ts, tr, tb, gbs, err = run(B, ctx, ns, bn, w, st, kt)
            print(f"B={B} ns={ns} bn={bn} w={w} st={st} KT={kt}: split {ts * 1e3:.1f} + red {tr * 1e3:.1f} = "
                  f"{tb * 1e3:.1f} us, {gbs:.0f} GB/s ({gbs / bw:.0%}) err {err:.2g}", flush=True)
