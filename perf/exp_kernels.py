"""Performance experiments (lead engineer): how fast can Triton 3.6 go on this
card for the headline shape (bf16, Dqk=192 as 128+64, Dv=128, H=32, Hkv=4,
block 16)? Standalone kernels without features, to learn which structure
reaches the SPEC section 8 targets before tuning the product kernels.

Run on the GPU:  python perf/exp_kernels.py
"""

from __future__ import annotations

import math
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split(q_ptr, kv_ptr, bt_ptr, sl_ptr, po_ptr, pm_ptr, pl_ptr,
                  s_qt, s_qh, s_kb, s_ks, s_kh, s_bt, scale_log2,
                  H: tl.constexpr, G: tl.constexpr, M_PAD: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                  DV: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr):
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


@triton.jit
def _decode_reduce(po_ptr, pm_ptr, pl_ptr, out_ptr, s_ot, s_oh, H: tl.constexpr, DV: tl.constexpr,
                   NSPLIT: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, NSPLIT)
    base = (t * H + h).to(tl.int64) * NSPLIT
    m = tl.load(pm_ptr + base + sp)
    lsum = tl.load(pl_ptr + base + sp)
    mx = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - mx), 0.0)
    acc = tl.load(po_ptr + (base + sp)[:, None] * DV + tl.arange(0, DV)[None, :])
    o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(out_ptr + t.to(tl.int64) * s_ot + h * s_oh + tl.arange(0, DV), o.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill(q_ptr, kv_ptr, bt_ptr, sl_ptr, qsl_ptr, out_ptr,
             s_qt, s_qh, s_kb, s_ks, s_kh, s_bt, s_ot, s_oh, scale_log2,
             H: tl.constexpr, G: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
             BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (q tiles of one seq, H, S); uniform prefill experiment (ctx = 0)
    mt = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    q0 = tl.load(qsl_ptr + seq)
    q1 = tl.load(qsl_ptr + seq + 1)
    q_len = q1 - q0
    m_start = mt * BLOCK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(sl_ptr + seq)
    ctx = seq_len - q_len
    kvh = h // G
    offs_m = m_start + tl.arange(0, BLOCK_M)
    mmask = offs_m < q_len
    qrow = q_ptr + (q0 + offs_m)[:, None].to(tl.int64) * s_qt + h * s_qh
    qa = tl.load(qrow + tl.arange(0, DA)[None, :], mask=mmask[:, None], other=0.0)
    qb = tl.load(qrow + DA + tl.arange(0, DB)[None, :], mask=mmask[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    pos = ctx + offs_m
    # unmasked tiles: keys below the tile's first position
    full_end = ((ctx + m_start) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(ctx + m_start + BLOCK_M, seq_len)
    for n0 in range(0, kv_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        kmask = offs < kv_end
        blk = tl.load(bt_ptr + seq.to(tl.int64) * s_bt + offs // BS, mask=kmask, other=0).to(tl.int64)
        base = blk * s_kb + (offs % BS).to(tl.int64) * s_ks + kvh * s_kh
        ka = tl.load(kv_ptr + base[None, :] + tl.arange(0, DA)[:, None], mask=kmask[None, :], other=0.0)
        kb = tl.load(kv_ptr + base[None, :] + DA + tl.arange(0, DB)[:, None], mask=kmask[None, :], other=0.0)
        v = tl.load(kv_ptr + base[:, None] + (DA + DB) + tl.arange(0, DV)[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(qa, ka)
        s = tl.dot(qb, kb, s)
        s = s * scale_log2
        if n0 >= full_end:
            s = tl.where((offs[None, :] <= pos[:, None]) & kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        lsum = lsum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m = m_new
    o = acc / lsum[:, None]
    orow = out_ptr + (q0 + offs_m)[:, None].to(tl.int64) * s_ot + h * s_oh + tl.arange(0, DV)[None, :]
    tl.store(orow, o.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def make(B, q_len, ctx, H=32, Hkv=4, Dqk=192, Dv=128, BS=16, dtype=torch.bfloat16, dev="cuda"):
    n = q_len + ctx
    nb = math.ceil(n / BS)
    total = B * nb + 1
    kv = torch.randn(total, BS, Hkv, Dqk + Dv, device=dev, dtype=dtype)
    perm = torch.randperm(total, device=dev)[: B * nb].view(B, nb).to(torch.int32)
    q = torch.randn(B * q_len, H, Dqk, device=dev, dtype=dtype)
    sl = torch.full((B,), n, dtype=torch.int32, device=dev)
    qsl = torch.arange(0, B + 1, dtype=torch.int32, device=dev) * q_len
    return q, kv, perm, sl, qsl


def ref(q, kv, bt, sl, qsl, B, q_len, n, H, Hkv, Dqk):
    import torch.nn.functional as F
    BS = kv.shape[1]
    nb = bt.shape[1]
    g = kv[bt.long()].reshape(B, nb * BS, Hkv, -1)[:, :n]
    k = g[..., :Dqk].transpose(1, 2).float()
    v = g[..., Dqk:].transpose(1, 2).float()
    qq = q.view(B, q_len, H, Dqk).transpose(1, 2).float()
    k = k.repeat_interleave(H // Hkv, 1)
    v = v.repeat_interleave(H // Hkv, 1)
    ctx = n - q_len
    mask = torch.arange(n, device=q.device)[None, :] <= (ctx + torch.arange(q_len, device=q.device))[:, None]
    o = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=Dqk ** -0.5)
    return o.transpose(1, 2).reshape(B * q_len, H, -1)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def decode_run(B, ctx, nsplit, block_n, warps, stages, H=32, Hkv=4, check=False):
    q, kv, bt, sl, qsl = make(B, 1, ctx)
    G = H // Hkv
    po = torch.empty(B * H * nsplit, 128, device="cuda", dtype=torch.float32)
    pm = torch.empty(B * H * nsplit, device="cuda", dtype=torch.float32)
    pl = torch.empty_like(pm)
    out = torch.empty(B, H, 128, device="cuda", dtype=torch.bfloat16)
    sc = 192 ** -0.5 * 1.4426950408889634

    def fn():
        _decode_split[(B, Hkv, nsplit)](q, kv, bt, sl, po, pm, pl, q.stride(0), q.stride(1), kv.stride(0),
                                        kv.stride(1), kv.stride(2), bt.stride(0), sc, H=H, G=G,
                                        M_PAD=max(16, G), DA=128, DB=64, DV=128, BS=16, BLOCK_N=block_n,
                                        NSPLIT=nsplit, num_warps=warps, num_stages=stages)
        _decode_reduce[(B, H)](po, pm, pl, out, out.stride(0), out.stride(1), H=H, DV=128, NSPLIT=nsplit,
                               num_warps=4)
    fn()
    err = None
    if check:
        r = ref(q, kv, bt, sl, qsl, B, 1, ctx + 1, H, Hkv, 192)
        err = (out.float() - r).abs().max().item()
    ms = bench(fn)
    nbytes = B * (ctx + 1) * Hkv * 320 * 2 + B * H * 320 * 2
    return ms, nbytes / ms / 1e6, err


def prefill_run(B, n, block_m, block_n, warps, stages, H=32, Hkv=4, check=False):
    q, kv, bt, sl, qsl = make(B, n, 0)
    out = torch.empty(B * n, H, 128, device="cuda", dtype=torch.bfloat16)
    sc = 192 ** -0.5 * 1.4426950408889634

    def fn():
        _prefill[(triton.cdiv(n, block_m), H, B)](q, kv, bt, sl, qsl, out, q.stride(0), q.stride(1), kv.stride(0),
                                                  kv.stride(1), kv.stride(2), bt.stride(0), out.stride(0),
                                                  out.stride(1), sc, H=H, G=H // Hkv, DA=128, DB=64, DV=128, BS=16,
                                                  BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                                  num_stages=stages)
    fn()
    err = None
    if check:
        r = ref(q, kv, bt, sl, qsl, B, n, n, H, Hkv, 192)
        err = (out.float() - r).abs().max().item()
    ms = bench(fn)
    flops = 2.0 * B * (n * (n + 1) / 2) * H * 320
    return ms, flops / ms / 1e9, err


def ceilings():
    n = 1 << 29
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms2 = bench(lambda: x @ y)
    return 2 * n / ms / 1e6, 2 * 8192**3 / ms2 / 1e9


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    bw, tf = ceilings()
    print(f"ceilings: copy {bw:.0f} GB/s, bf16 matmul {tf:.0f} TFLOP/s", flush=True)
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("all", "decode"):
        for B, ctx in [(1, 32767), (16, 8191), (64, 4095), (256, 2047)]:
            best = None
            for nsplit in ([64, 128, 256] if B == 1 else [4, 8, 16] if B == 16 else [1, 2, 4] if B == 64 else [1, 2]):
                for bn in (32, 64, 128):
                    for w, st in ((4, 2), (4, 3), (4, 4), (8, 3)):
                        try:
                            ms, gbs, err = decode_run(B, ctx, nsplit, bn, w, st, check=best is None)
                        except Exception as e:  # noqa
                            print("fail", B, nsplit, bn, w, st, str(e)[:80])
                            continue
                        if err is not None:
                            print(f"  check err {err:.3g}")
                        if best is None or ms < best[0]:
                            best = (ms, gbs, nsplit, bn, w, st)
            print(f"decode B={B} L={ctx + 1}: best {best[0] * 1e3:.1f} us {best[1]:.0f} GB/s ({best[1] / bw:.0%}) "
                  f"nsplit={best[2]} BLOCK_N={best[3]} warps={best[4]} stages={best[5]}", flush=True)
    if which in ("all", "prefill"):
        for B, n in [(1, 8192), (4, 2048)]:
            best = None
            for bm, bn, w, st in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3),
                                  (128, 64, 4, 3), (64, 128, 4, 2)]:
                try:
                    ms, tfs, err = prefill_run(B, n, bm, bn, w, st, check=best is None)
                except Exception as e:  # noqa
                    print("fail", bm, bn, w, st, str(e)[:100])
                    continue
                if err is not None:
                    print(f"  check err {err:.3g}")
                print(f"  prefill {B}x{n} BM={bm} BN={bn} w={w} st={st}: {ms:.3f} ms {tfs:.0f} TFLOP/s", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, tfs, bm, bn, w, st)
            print(f"prefill {B}x{n}: best {best[0]:.3f} ms {best[1]:.0f} TFLOP/s ({best[1] / tf:.0%}) {best[2:]}",
                  flush=True)
