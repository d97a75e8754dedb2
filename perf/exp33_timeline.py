"""Experiment 33: where a Gluon prefill program spends its time.

The timings of exp25-30 fit ``time = programs/SM x X + tiles/SM x tau`` with
X ~3.4 us of fixed cost per program and tau ~2.0 us per 128x128 KV tile
(perf/NOTES.md); hiding X with two programs per SM (exp32) or persistence
(exp24, exp26) lost. This run measures X instead of fitting it: the product
kernel (diffkv/triton/kernels/prefill_gluon.py), patched at run time -- no
copy kept -- to record per program %globaltimer at its start, before the
partitions fork, when tile 0's K arrived (consumer 0), after its loop and
after its store, with %smid, and %clock64 beside tile 0 and the loop's end
(the SM clock in the loop: these cards slow down under sustained tensor
work). From those: the gap between one program's end
and the next program's start on the same SM, the prologue, the wait for the
first tile, the time per tile and the tail.

    python perf/exp33_timeline.py [variant.py]

Outcome (H100, perf/logs/exp33_h100.log, exp34_h100.log, exp36_h100.log):
at 4x2k each program pays ~4.6 us outside its loop -- lookups 0.6, tile 0's
K/Q 1.8 (96 KB at the L2 -> SM rate), last PV + store 0.9, gap to the next
program on the SM 1.3 -- against 2.0 us per 128x128 tile in the loop; the SM
clock in the loop is ~1650 MHz for the 0.2-0.3 ms prefills and ~1490 MHz for
the 1 ms 1x8k prefill (max 1980 MHz: power-limited).

A variant module whose ``prefill`` takes ``tl=`` (e.g. the persistent
perf/exp35_persistent_prefill_gluon.py, one record per work item: "start"
is when its consumers read the item's record) is timed the same way.
"""

from __future__ import annotations

import pathlib
import types

import torch

from diffkv.triton.kernels import prefill_gluon as pg

SRC = pathlib.Path(pg.__file__)

TIMER = '''
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
    def tile_owner('''

PATCHES = [
    ("\n    @gluon.jit\n    def tile_owner(", TIMER),
    ("        sinks_ptr,  # [H] fp32 (USE_SINKS)\n", "        sinks_ptr,  # [H] fp32 (USE_SINKS)\n        tl_ptr,\n"),
    ("        h = gl.program_id(0)\n", "        h = gl.program_id(0)\n        t_start = _timer(h)\n"),
    ("            gl.warp_specialize([", "            t_meta = _timer(h)\n            gl.warp_specialize(["),
    ("stride_o1, HALF_M, BLOCK_N, DV, NUM_BUF, USE_SINKS)),",
     "stride_o1, tl_ptr, t_start, t_meta, HALF_M, BLOCK_N, DV, NUM_BUF, USE_SINKS)),"),
    ("h, stride_o0, stride_o1,\n                  HALF_M: gl.constexpr",
     "h, stride_o0, stride_o1,\n                  tl_ptr, t_start, t_meta, HALF_M: gl.constexpr"),
    ("        mbarrier.wait(k_ready.index(0), 0)\n",
     "        mbarrier.wait(k_ready.index(0), 0)\n        t1 = _timer(h)\n        c1 = _clock(h)\n"),
    ("        # last tile: PV(n_tiles - 1)\n",
     "        t2 = _timer(h)\n        c2 = _clock(h)\n        # last tile: PV(n_tiles - 1)\n"),
    ("        gl.store(out_ptr + offs, out_c, mask=(r0 + r < q_len)[:, None] & (dv < DV)[None, :])\n",
     "        gl.store(out_ptr + offs, out_c, mask=(r0 + r < q_len)[:, None] & (dv < DV)[None, :])\n"
     "        t3 = _timer(h)\n"
     "        if c == 0:\n"
     "            rec = tl_ptr + (gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)).to(gl.int64) * 16\n"
     "            gl.store(rec + 0, t_start)\n"
     "            gl.store(rec + 1, t_meta)\n"
     "            gl.store(rec + 2, t1)\n"
     "            gl.store(rec + 3, t2)\n"
     "            gl.store(rec + 4, t3)\n"
     "            gl.store(rec + 5, _smid(h).to(gl.int64))\n"
     "            gl.store(rec + 6, n_tiles.to(gl.int64))\n"
     "            gl.store(rec + 7, c1)\n"
     "            gl.store(rec + 8, c2)\n"),
]


def instrumented():
    """The product module with the timeline records (prefill takes ``tl``)."""
    src = SRC.read_text()
    for old, new in PATCHES:
        assert src.count(old) >= 1, old
        src = src.replace(old, new)
    src = src.replace("        sinks if sinks is not None else seq_lens,\n",
                      "        sinks if sinks is not None else seq_lens, tl,\n")
    src = src.replace("            q_len_range: tuple[int, int]) -> torch.Tensor:",
                      "            q_len_range: tuple[int, int], tl=None) -> torch.Tensor:")
    path = pathlib.Path("/tmp/exp33_prefill_gluon_timeline.py")  # gluon.jit needs a source file
    path.write_text(src)
    import importlib.util

    spec = importlib.util.spec_from_file_location("exp33_prefill_gluon_timeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def summarize(name: str, rec: torch.Tensor, kernel_ms: float):
    rec = rec[rec[:, 4] > 0].double()
    t0 = rec[:, 0].min()
    start, meta, first, loop_end, end, sm, tiles = (rec[:, i] for i in range(7))
    us = 1e-3
    print(f"== {name}: {rec.shape[0]} programs on {int(sm.max().item()) + 1} SMs, kernel {kernel_ms:.4f} ms "
          f"(timeline span {(end.max() - t0).item() * us:.1f} us)")
    prologue = (meta - start) * us
    wait_first = (first - meta) * us
    per_tile = (loop_end - first) * us / (tiles - 1).clamp(min=1)
    tail = (end - loop_end) * us
    total = (end - start) * us
    long = tiles >= 4
    clock = ((rec[:, 8] - rec[:, 7]) / (loop_end - first))[long] * 1e3  # cycles per ns -> MHz
    for label, v in (("SM clock in the loop MHz", clock), ("prologue (lookups) us", prologue), ("to tile 0's K us", wait_first),
                     ("per tile in the loop us", per_tile[tiles > 1]), ("tail (last PV + store) us", tail),
                     ("program total us", total)):
        q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=v.dtype)).tolist()
        print(f"  {label:24s} mean {v.mean().item():7.2f}     p10 {q[0]:7.2f}  p50 {q[1]:7.2f}  p90 {q[2]:7.2f}")
    gaps, busy, first_start, last_end = [], [], [], []
    for s in sm.unique():
        m = sm == s
        st, en = start[m].sort()[0], end[m][start[m].argsort()]
        gaps.append(((st[1:] - en[:-1]) * us))
        busy.append(((en - st) * us).sum())
        first_start.append((st[0] - t0) * us)
        last_end.append((en[-1] - t0) * us)
    g = torch.cat(gaps)
    print(f"  gap end -> next start on an SM: mean {g.mean().item():.2f} us, p50 {g.median().item():.2f}, "
          f"min {g.min().item():.2f}, max {g.max().item():.2f}")
    busy = torch.stack(busy)
    print(f"  per SM: busy {busy.mean().item():.1f} us (min {busy.min().item():.1f}, max {busy.max().item():.1f}); "
          f"first start {torch.stack(first_start).max().item():.2f} us late at most; last end "
          f"{torch.stack(last_end).min().item():.1f}..{torch.stack(last_end).max().item():.1f} us")
    n = rec.shape[0]
    print(f"  sums over programs / SMs: prologue {prologue.sum().item() / 132:.1f} us, to tile 0 "
          f"{wait_first.sum().item() / 132:.1f}, loop {((loop_end - first) * us).sum().item() / 132:.1f}, tail "
          f"{tail.sum().item() / 132:.1f}, gaps {g.sum().item() / 132:.1f} (per SM, {n / 132:.1f} programs each)")


def main():
    import importlib.util
    import sys

    from diffkv.bench import SCENARIOS, as_graph, build_batch, run_backend, time_fn

    dev = torch.device("cuda")
    if len(sys.argv) > 1:
        spec = importlib.util.spec_from_file_location(pathlib.Path(sys.argv[1]).stem, sys.argv[1])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = instrumented()
    print(torch.cuda.get_device_name())
    for sname in ("prefill_4x2k", "prefill_1x8k", "mixed.prefill_part"):
        s = SCENARIOS[sname]
        b = build_batch(s, dev)
        md = b.common
        fn = run_backend(s, b, "triton")
        fn()
        torch.cuda.synchronize()
        ref = b.out.clone()
        ms_prod, _, _ = time_fn(as_graph(fn) or fn)
        T = b.query.shape[0]
        H = s.num_heads
        n_prog = H * (T // pg.BLOCK_M + md.num_reqs)
        tl = torch.zeros(n_prog, 16, dtype=torch.int64, device=dev)
        qsl, sl, bt = md.query_start_loc.to(dev), md.seq_lens.to(dev), md.block_table_tensor.to(dev)

        def run():
            mod.prefill(b.query, b.kv_cache, qsl, sl, bt, b.out, scale=s.head_size**-0.5, sinks=b.sinks,
                        q_len_range=(0, 2**31 - 1), tl=tl)

        run()
        torch.cuda.synchronize()
        print(f"{sname}: max |instrumented - product| {(b.out.float() - ref.float()).abs().max().item():.3g}")
        ms_inst, _, _ = time_fn(as_graph(run) or run)
        print(f"{sname}: product {ms_prod:.4f} ms, instrumented {ms_inst:.4f} ms")
        from diffkv.bench import _flush_buffer

        for _ in range(3):  # the last launch after an L2 flush, like the timed ones
            tl.zero_()
            _flush_buffer(dev).sum()
            run()
        torch.cuda.synchronize()
        summarize(sname, tl.cpu(), ms_inst)


if __name__ == "__main__":
    main()
