"""``diffkv demo``: one realistic serving step, end to end.

A mixed batch -- a full prefill, a chunked prefill on top of cached context,
multi-token (speculative) decodes, single-token decodes and an idle
sequence -- for a model with Dqk=192 / Dv=128 and GQA, through two layers:
a sliding-window + sinks layer and a full-attention layer. For each layer
the new K/V are written into the paged cache and attention runs through the
chosen backend; the output is checked against the reference computed in
float64 on the same inputs and the time per step is printed.
"""

from __future__ import annotations

import argparse
import time

import torch

import diffkv
from diffkv.backends import resolve_backend
from diffkv.reference import paged_attention as reference_attention
from diffkv.testing import BatchSpec, LayerFeatures, SeqShape, compare, make_batch

SIZES = {
    # (seqs, H, Hkv): "small" keeps the CPU run (and the Triton interpreter) quick
    "small": ((SeqShape(48, 0), SeqShape(16, 40), SeqShape(3, 70), SeqShape(1, 90), SeqShape(1, 33),
               SeqShape(0, 20)), 8, 2),
    "large": ((SeqShape(2048, 0), SeqShape(512, 3584), SeqShape(4, 8000), SeqShape(4, 2000))
              + tuple(SeqShape(1, 1000 + 250 * i) for i in range(28)) + (SeqShape(0, 500),), 32, 4),
}

LAYERS = {
    "window128+sinks": LayerFeatures(sliding_window=128, sinks=True),
    "full": LayerFeatures(),
}


def run_demo(backend: str = "auto", size: str | None = None, device: str | None = None, dtype: str | None = None,
             repeats: int = 5) -> bool:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = size or ("large" if dev.type == "cuda" else "small")
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    seqs, H, Hkv = SIZES[size]
    backend_cls = resolve_backend(backend, dev)
    print(f"diffkv demo on {_device_name(dev)} -- backend {backend_cls.get_name()}, dtype {str(dt)[6:]}, "
          f"Dqk=192 Dv=128 H={H} Hkv={Hkv} block 16")
    kinds: dict[str, int] = {}
    for s in seqs:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    print("batch: " + ", ".join(f"{n} x {k}" for k, n in kinds.items())
          + f"; {sum(s.q_len for s in seqs)} query tokens, {sum(s.seq_len for s in seqs)} keys")
    ok = True
    for li, (name, features) in enumerate(LAYERS.items()):
        spec = BatchSpec(seqs=seqs, num_heads=H, num_kv_heads=Hkv, head_size=192, head_size_v=128, block_size=16,
                         dtype=dt, padding_rows=3, seed=li)
        b = make_batch(spec, features, device=dev)
        # the cache arrives without the new tokens: clear their slots, then write them
        flat = b.kv_cache.view(-1, Hkv, 320)
        written = b.slot_mapping[b.slot_mapping >= 0]
        expected_rows = flat[written].clone()
        flat[written] = 0
        diffkv.write_kv_cache(b.key, b.value, b.kv_cache, b.slot_mapping, backend=backend)
        cache_ok = torch.equal(flat[written], expected_rows)

        def step():
            diffkv.paged_attention(b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table, out=b.out,
                                   backend=backend, validate=False, **b.attention_kwargs())

        step()
        times = []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        ref = reference_attention(
            b.query.double(), b.kv_cache.double(), b.query_start_loc, b.seq_lens, b.block_table,
            **{**b.attention_kwargs(),
               "alibi_slopes": None if b.alibi_slopes is None else b.alibi_slopes.double(),
               "sinks": None if b.sinks is None else b.sinks.double()},
        )
        T = spec.num_tokens
        cmp = compare(b.out[:T], ref[:T], dt, what="attention output")
        pad_ok = bool(torch.isnan(b.out[T:]).all())
        times.sort()
        print(f"  layer {li} ({name:>16}): cache write {'exact' if cache_ok else 'WRONG'}, "
              f"max |err| vs float64 reference {cmp.max_abs_err:.2e} ({'ok' if cmp.ok else 'FAIL'}), "
              f"padding rows {'untouched' if pad_ok else 'WRITTEN'}, "
              f"{times[len(times) // 2] * 1e3:.3f} ms/step (median of {repeats})")
        ok &= cache_ok and cmp.ok and pad_ok
    print("demo " + ("passed" if ok else "FAILED"))
    return ok


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "CPU"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="auto (Triton on GPU, reference on CPU), reference, triton")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: large on GPU, small on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    p.add_argument("--repeats", type=int, default=5)
