"""A representative subset of the Triton kernels for compute-sanitizer
(``scripts/gpu_memcheck.sh``): every kernel (cache writer, single-pass and
split attention, reduce), every feature flag, GQA with a padded head tile, the Gluon prefill (sm_90),
Dqk = 192 (two dot chunks), permuted blocks, out-of-range ids in unused
block-table columns, NaN padding rows, q_len = 0 sequences, vLLM-strided
cache. Prints one line per case; exits non-zero on a wrong result."""

from __future__ import annotations

import sys

import torch

import diffkv
from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, make_batch
from tests.triton_common import check_output, run_class_api, run_kernel

MIXED = (SeqShape(0, 20), SeqShape(1, 150), SeqShape(37, 60), SeqShape(4, 90), SeqShape(45, 0), SeqShape(0, 0))
ALL = LayerFeatures(sliding_window=70, softcap=20.0, alibi="linear", sinks=True)
SQRT = LayerFeatures(alibi="sqrt", sinks=True, softcap=5.0)


def plant_out_of_bounds_write() -> int:
    """Self-test of the tool: the raw cache-writer launcher (no validation)
    with one slot far past the cache -- memcheck must report it."""
    from diffkv.triton.kernels.cache_writer import write_kv_cache

    key = torch.randn(4, 2, 64, device="cuda", dtype=torch.float16)
    value = torch.randn(4, 2, 32, device="cuda", dtype=torch.float16)
    cache = torch.zeros(2, 16, 2, 96, device="cuda", dtype=torch.float16)
    slots = torch.tensor([0, 1, 2, 2 * 16 * 4096], device="cuda")
    write_kv_cache(key, value, cache, slots)
    torch.cuda.synchronize()
    print("planted out-of-bounds write launched", flush=True)
    return 0


def main() -> int:
    if "--plant-oob" in sys.argv:
        return plant_out_of_bounds_write()
    cases = [
        ("mixed bf16 192/128 all features, heuristic", BatchSpec(MIXED, 16, 2, 192, 128, 16, torch.bfloat16, 3), ALL, None),
        ("mixed fp16 split 5", BatchSpec(MIXED, 12, 4, 96, 64, 32, torch.float16, 2), SQRT, 5),
        ("decode fp32 GQA 3, split 16", BatchSpec((SeqShape(1, 300), SeqShape(2, 50)), 6, 2, 80, 48, 16,
                                                  torch.float32, 2), ALL, 16),
        ("decode bf16 256/256 block 64", BatchSpec((SeqShape(1, 700), SeqShape(1, 5)), 8, 1, 256, 256, 64,
                                                    torch.bfloat16, 1), SQRT, None),
        # the Gluon prefill kernel on sm_90 (causal + sinks; partial last tiles over NaN-poisoned slots)
        ("gluon prefill bf16 192/128 sinks, block 16", BatchSpec(MIXED, 16, 2, 192, 128, 16, torch.bfloat16, 3),
         LayerFeatures(sinks=True), None),
        ("gluon prefill fp16 192/128, block 64", BatchSpec((SeqShape(200, 0), SeqShape(77, 300)), 8, 2, 192, 128,
                                                           64, torch.float16, 2), LayerFeatures(), None),
        # the Gluon decode kernel on sm_90 (speculative decodes, partial last pages over NaN-poisoned slots,
        # split 7 leaves empty splits; unsplit with sinks; 128-token pages)
        ("gluon decode bf16 192/128, split 7", BatchSpec((SeqShape(1, 300), SeqShape(5, 40), SeqShape(8, 1000)), 32,
                                                         4, 192, 128, 16, torch.bfloat16, 3), LayerFeatures(), 7),
        ("gluon decode bf16 192/128 sinks, unsplit", BatchSpec((SeqShape(1, 77), SeqShape(3, 500)), 32, 4, 192,
                                                               128, 16, torch.bfloat16, 2),
         LayerFeatures(sinks=True), 1),
        ("gluon decode fp16 192/128 block 128, heuristic", BatchSpec((SeqShape(1, 1300), SeqShape(2, 90)), 16, 2,
                                                                     192, 128, 128, torch.float16, 2),
         LayerFeatures(sinks=True), None),
    ]
    for name, spec, features, splits in cases:
        batch = make_batch(spec, features, device="cuda")
        out = run_class_api(batch, num_splits=splits) if splits is None else run_kernel(batch, num_splits=splits)
        torch.cuda.synchronize()
        check_output(out, batch)
        print(f"ok: {name}", flush=True)
    # gathered prefill whose copy buffer is too small: the sequences past it read the paged cache
    from diffkv.triton.kernels import attention as tk

    batch = make_batch(BatchSpec((SeqShape(70, 0), SeqShape(33, 90), SeqShape(40, 200)), 8, 2, 192, 128, 64,
                                 torch.bfloat16, 2), LayerFeatures(alibi="sqrt", sinks=True), device="cuda")
    ws = tk.Workspace.allocate(256, 8, 128, "cuda", kv_rows=150, kv_row_width=2 * 320, kv_dtype=torch.bfloat16)
    out = batch.fresh_out()
    kw = batch.attention_kwargs()
    kw["sinks"] = batch.sinks.float()
    tk.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table, out,
                       workspace=ws, max_query_len=70, max_seq_len=240, **kw)
    torch.cuda.synchronize()
    check_output(out, batch)
    print("ok: gathered prefill, buffer overflow -> paged reads, block 64, ALiBi sqrt", flush=True)
    # vLLM-strided cache through the functional API
    batch = make_batch(BatchSpec(MIXED, 8, 2, 192, 128, 16, torch.bfloat16, 2), ALL, device="cuda")
    batch.kv_cache = batch.kv_cache.transpose(1, 2).contiguous().transpose(1, 2)
    out = batch.fresh_out()
    diffkv.paged_attention(batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table,
                           out=out, backend="triton", **batch.attention_kwargs())
    check_output(out, batch)
    # the cache writer, negative slots included, into the strided cache
    cache = batch.kv_cache.clone().transpose(1, 2).contiguous().transpose(1, 2)
    diffkv.write_kv_cache(batch.key, batch.value, cache, batch.slot_mapping, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(cache.contiguous().view(torch.int16), batch.kv_cache.contiguous().view(torch.int16))
    print("ok: functional + cache writer on vLLM-strided cache", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
