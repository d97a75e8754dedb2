"""Compile the attention kernel for sm_90 on a machine without a GPU and report
what the compiler made of it: registers, shared memory, spills, and how many
global loads of the main loop became asynchronous copies (cp.async / TMA).

    python perf/compile_sm90.py [decode|prefill] [--dump DIR]

Uses the plan the launcher would pick for the SPEC headline shape (bf16,
Dqk=192, Dv=128, H=32, Hkv=4, block 16).
"""

from __future__ import annotations

import argparse
import os
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from diffkv.triton import launch
from diffkv.triton.kernels import attention as tk

# the kernel's runtime arguments in order, with the Triton type of each
RUNTIME_ARGS = [
    ("q_ptr", "*bf16"), ("cache_ptr", "*bf16"), ("out_ptr", "*bf16"), ("qsl_ptr", "*i32"),
    ("seq_lens_ptr", "*i32"), ("bt_ptr", "*i32"), ("alibi_ptr", "*fp32"), ("sinks_ptr", "*fp32"),
    ("part_out_ptr", "*fp32"), ("part_max_ptr", "*fp32"), ("part_sum_ptr", "*fp32"),
    ("ka_desc", "*bf16"), ("kb_desc", "*bf16"), ("v_desc", "*bf16"), ("kv_start_ptr", "*i32"), ("kv_capacity", "i32"),
    ("num_seqs", "i32"), ("num_heads", "i32"), ("num_bt_cols", "i32"), ("num_splits", "i32"),
    ("q_len_lo", "i32"), ("q_len_hi", "i32"), ("qk_scale", "fp32"), ("softcap_log2", "fp32"), ("window", "i32"),
    ("stride_q0", "i32"), ("stride_q1", "i32"), ("stride_c0", "i32"), ("stride_c1", "i32"), ("stride_c2", "i32"),
    ("stride_o0", "i32"), ("stride_o1", "i32"), ("stride_bt0", "i32"),
]


def plan_for(regime: str) -> launch.LaunchPlan:
    if regime == "decode":
        return launch.plan_attention(num_tokens=1, num_seqs=1, num_heads=32, num_kv_heads=4, head_size=192,
                                     head_size_v=128, dtype=torch.bfloat16, max_query_len=1, max_seq_len=32768,
                                     arch="sm90", num_sms=132, max_splits=64)
    return launch.plan_attention(num_tokens=8192, num_seqs=1, num_heads=32, num_kv_heads=4, head_size=192,
                                 head_size_v=128, dtype=torch.bfloat16, max_query_len=8192, max_seq_len=8192,
                                 arch="sm90", num_sms=132, max_splits=1)


def compile_kernel(plan: launch.LaunchPlan, extra_constexprs: dict | None = None, fn=None):
    fn = fn or tk._attention_kernel
    names = fn.arg_names
    sig = {}
    constexprs = {
        "BLOCK_SIZE": 16, "G": 8, "G_TILE": plan.g_tile, "NUM_G_TILES": plan.num_g_tiles, "BLOCK_Q": plan.block_q,
        "IDX_Q": plan.block_q, "BLOCK_M": plan.block_m, "BLOCK_N": plan.block_n, "DQK": 192, "D1": plan.d1,
        "D2": plan.d2, "DV": 128, "DV_PAD": plan.dv_pad, "USE_SOFTCAP": False, "USE_WINDOW": False,
        "USE_ALIBI": False, "ALIBI_SQRT": False, "USE_SINKS": False, "SPLIT": plan.num_splits > 1, "IEEE": False,
        "PHASED": plan.phased, "PRELOAD_TILES": plan.preload_tiles, "FOLD_SCALE": True, "KV_DESC": False, "PAGES_PER_TILE": max(1, plan.block_n // 16),
    }
    constexprs.update(extra_constexprs or {})
    types = dict(RUNTIME_ARGS)
    for n in names:
        sig[n] = "constexpr" if n in constexprs else types[n]
    # pointers 16-byte aligned and strides divisible by 16, as the JIT specializes them at run time
    aligned = [[i] for i, n in enumerate(names) if n in types and (types[n].startswith("*") or n.startswith("stride"))
               and n not in ("stride_q1",)]
    attrs = {tuple(a): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": plan.num_warps, "num_stages": plan.num_stages})


def ptxas_usage(ptx: str) -> str:
    """Register / spill line of ``ptxas -v`` for sm_90a."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    lines = [ln.split("info    : ")[-1] for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln]
    return "; ".join(lines) or r.stderr[-300:]


def report(k, dump: str | None, tag: str) -> None:
    ttgir = k.asm["ttgir"]
    ptx = k.asm["ptx"]
    print(f"[{tag}] shared {k.metadata.shared} B; ptxas: {ptxas_usage(ptx)}")
    print(f"  async copies to shared (ttgir): {len(re.findall(r'async_copy_global_to_local', ttgir))}, "
          f"plain loads: {len(re.findall(r'tt.load ', ttgir))}, local_alloc: {len(re.findall(r'local_alloc', ttgir))}")
    print(f"  ptx: cp.async {ptx.count('cp.async.cg') + ptx.count('cp.async.ca')}, ld.global {ptx.count('ld.global')}, "
          f"wgmma {ptx.count('wgmma.mma_async')}, mma.sync {ptx.count('mma.sync')}")
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{tag}.{ext}"), "w") as f:
                f.write(k.asm[ext])


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("regime", nargs="?", default="decode")
    p.add_argument("--dump")
    p.add_argument("--block-n", type=int)
    p.add_argument("--stages", type=int)
    p.add_argument("--warps", type=int)
    a = p.parse_args()
    plan = plan_for(a.regime)
    from dataclasses import replace
    if a.block_n:
        plan = replace(plan, block_n=a.block_n)
    if a.stages:
        plan = replace(plan, num_stages=a.stages)
    if a.warps:
        plan = replace(plan, num_warps=a.warps)
    print(plan)
    report(compile_kernel(plan), a.dump, f"{a.regime}_bn{plan.block_n}_st{plan.num_stages}_w{plan.num_warps}")
