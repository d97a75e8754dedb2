"""``diffkv bench``: named scenarios against ceilings measured in the same run.

For every scenario it prints the time (median and p20-p80 spread), the
achieved GB/s over the minimal bytes (each needed KV byte once + q + out),
the achieved TFLOP/s over the causal FLOPs actually needed, both as
fractions of the ceilings measured in the same run (device copy bandwidth;
dense bf16 matmul), and a plain-PyTorch baseline (gather + SDPA) for sanity.
Decode scenarios also get a read floor (``%floor``): the time a plain read of
the same K/V pages takes (:mod:`diffkv.read_floor`). It writes JSON and a
PNG plot. The GPU is named in every output.

Scenario syntax for custom shapes (``--seqs``): comma-separated groups
``N x Q @ CTX`` -- N sequences of Q new tokens after CTX cached ones, e.g.
``1x2048@2048,62x1@4096``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from diffkv.backends import load_backend
from diffkv.metadata import CommonAttentionMetadata, KVCacheSpec


@dataclass(frozen=True)
class Scenario:
    name: str
    seqs: tuple[tuple[int, int, int], ...]  # (count, q_len, context_len)
    kind: str  # "decode" | "prefill" | "mixed"
    num_heads: int = 32
    num_kv_heads: int = 4
    head_size: int = 192
    head_size_v: int = 128
    block_size: int = 16
    dtype: str = "bfloat16"
    sliding_window: int | None = None
    sinks: bool = False
    softcap: float | None = None
    alibi: str | None = None
    parts: tuple[str, ...] = ()  # names of scenarios whose sum this one must beat
    note: str = ""

    def seq_list(self) -> list[tuple[int, int]]:
        return [(q, c) for n, q, c in self.seqs for _ in range(n)]


def _spec_scenarios() -> list[Scenario]:
    """SPEC section 8 (H100, bf16, Dqk=192, Dv=128, H=32, Hkv=4, block 16)."""
    return [
        Scenario("decode_b1_32k", ((1, 1, 32767),), "decode"),
        Scenario("decode_b16_8k", ((16, 1, 8191),), "decode"),
        Scenario("decode_b64_4k", ((64, 1, 4095),), "decode"),
        Scenario("decode_b256_2k", ((256, 1, 2047),), "decode"),
        Scenario("decode_b64_8k_win128_sinks", ((64, 1, 8191),), "decode", num_kv_heads=8, sliding_window=128,
                 sinks=True, note="Hkv=8; bytes of the window only"),
        Scenario("prefill_1x8k", ((1, 8192, 0),), "prefill"),
        Scenario("prefill_4x2k", ((4, 2048, 0),), "prefill"),
        Scenario("mixed.prefill_part", ((1, 2048, 2048),), "prefill", note="2k chunk on 2k context"),
        Scenario("mixed.decode_part", ((62, 1, 4095),), "decode", note="62 decodes at 4k"),
        Scenario("mixed_2kchunk_62dec", ((1, 2048, 2048), (62, 1, 4095)), "mixed",
                 parts=("mixed.prefill_part", "mixed.decode_part")),
    ]


SCENARIOS = {s.name: s for s in _spec_scenarios()}

# vLLM Triton DiffKV and best-peer figures from SPEC section 8 (H100), as fractions of their run's ceilings
PEERS = {
    "decode_b1_32k": {"vLLM Triton DiffKV": 0.13, "best peer (cuDNN)": 0.57},
    "decode_b16_8k": {"vLLM Triton DiffKV": 0.59, "best peer (cuDNN)": 0.83},
    "decode_b64_4k": {"vLLM Triton DiffKV": 0.72, "best peer (cuDNN)": 0.90},
    "decode_b256_2k": {"vLLM Triton DiffKV": 0.93, "best peer (Flex)": 0.98},
    "prefill_1x8k": {"vLLM Triton DiffKV": 0.09, "best peer (cuDNN dense)": 0.82},
    "prefill_4x2k": {"vLLM Triton DiffKV": 0.09, "best peer (cuDNN dense)": 0.60},
}
TARGETS = {"decode": 0.90, "prefill": 0.75}


def parse_seqs(text: str) -> tuple[tuple[int, int, int], ...]:
    groups = []
    for part in text.split(","):
        part = part.strip().replace(" ", "")
        try:
            count, rest = part.split("x", 1)
            q, ctx = rest.split("@", 1)
            groups.append((int(count), int(q), int(ctx)))
        except ValueError:
            raise SystemExit(f"--seqs: cannot parse {part!r}; expected N x Q @ CTX, e.g. 62x1@4096") from None
    return tuple(groups)


# -- workload accounting ------------------------------------------------------
def needed_keys(q_len: int, context_len: int, window: int | None) -> tuple[int, int]:
    """(distinct keys read, allowed (query, key) pairs) of one sequence."""
    seq_len = q_len + context_len
    if q_len == 0:
        return 0, 0
    first_pos = context_len
    lo = 0 if window is None else max(0, first_pos - window + 1)
    keys = seq_len - lo
    pairs = 0
    # row i at position p = context_len + i sees keys max(0, p-W+1) .. p
    if window is None:
        pairs = q_len * context_len + q_len * (q_len + 1) // 2
    else:
        for i in range(q_len):
            p = context_len + i
            pairs += p - max(0, p - window + 1) + 1
    return keys, pairs


def workload(s: Scenario) -> tuple[int, float]:
    """(minimal bytes, causal FLOPs actually needed)."""
    elt = torch.tensor([], dtype=getattr(torch, s.dtype)).element_size()
    total_bytes = 0
    flops = 0.0
    for q, c in s.seq_list():
        keys, pairs = needed_keys(q, c, s.sliding_window)
        total_bytes += keys * s.num_kv_heads * (s.head_size + s.head_size_v) * elt
        total_bytes += q * s.num_heads * (s.head_size + s.head_size_v) * elt  # q in, out
        flops += 2.0 * pairs * s.num_heads * (s.head_size + s.head_size_v)
    return total_bytes, flops


# -- timing -----------------------------------------------------------------
FLUSH_MODES = ("read", "write")
"""How L2 is flushed before each timed run. ``read``: 256 MB (at least 4x
the L2) are read, so L2 holds only clean lines and every K/V byte still
comes from DRAM. ``write``: 256 MB of zeros are written first, as
``triton.testing.do_bench`` does; L2 is then full of dirty lines and the timed
kernel's reads force their write-back (measured on an H100: ~9 us of every
decode timing, ~10-20% of a small decode; perf/exp9.py)."""

_FLUSH_BUFFERS: dict = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A float32 buffer of max(256 MB, 4 x L2) per device, made on first use."""
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _FLUSH_BUFFERS:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        nbytes = max(256 << 20, 4 * l2)
        _FLUSH_BUFFERS[key] = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return _FLUSH_BUFFERS[key]


def time_fn(fn, reps_ms: int = 200, flush: str = "read") -> tuple[float, float, float]:
    """(median, p20, p80) in ms of ``fn``, timed with CUDA events around each
    run, L2 flushed before each run (see :data:`FLUSH_MODES`)."""
    if flush not in FLUSH_MODES:
        raise ValueError(f"flush={flush!r}: expected one of {FLUSH_MODES}")
    buf = _flush_buffer(torch.device("cuda"))
    sink = torch.empty((), dtype=torch.float32, device=buf.device)

    def do_flush():
        if flush == "read":
            torch.sum(buf, dim=0, out=sink)
        else:
            buf.zero_()

    for _ in range(5):  # warm-up (compilation, caches of the allocator)
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-3)
    reps = int(min(1000, max(10, reps_ms / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        do_flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ts = torch.tensor([s.elapsed_time(e) for s, e in events])
    q = torch.quantile(ts, torch.tensor([0.5, 0.2, 0.8])).tolist()
    return float(q[0]), float(q[1]), float(q[2])


def as_graph(fn):
    """``fn`` captured in a CUDA graph; returns its replay (None if ``fn`` is
    not capturable). Serving engines replay decode steps from graphs, and a
    replay costs the host one launch, so the timings measure the GPU's work
    rather than Python's launch overhead (do_bench still flushes L2 before
    every replay)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph.replay
    except Exception:  # noqa: BLE001 - a non-capturable callable is timed eagerly
        torch.cuda.synchronize()
        return None


def measure_ceilings(device: torch.device, flush: str = "read") -> dict:
    """Device copy bandwidth (512 MiB read + 512 MiB written, an eager
    ``copy_``; the same copy captured in a CUDA graph ran ~20% slower on an
    H100, perf/exp9.py) and dense bf16 matmul
    TFLOP/s (8192^3), timed like the scenarios."""
    n = 1 << 29  # 1 GiB of bytes moved
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms, _, _ = time_fn(lambda: dst.copy_(src), flush=flush)
    copy_gbs = 2 * n / (ms * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms_mm, _, _ = time_fn(lambda: a @ b, flush=flush)
    tflops = 2 * m**3 / (ms_mm * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": tflops}


# -- batch construction on the device ------------------------------------------
@dataclass
class DeviceBatch:
    query: torch.Tensor
    kv_cache: torch.Tensor
    common: CommonAttentionMetadata
    out: torch.Tensor
    sinks: torch.Tensor | None
    alibi: torch.Tensor | None
    extra: dict = field(default_factory=dict)


def build_batch(s: Scenario, device: torch.device, seed: int = 0) -> DeviceBatch:
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, s.dtype)
    seqs = s.seq_list()
    BS = s.block_size
    nblocks = [math.ceil((q + c) / BS) for q, c in seqs]
    total_blocks = sum(nblocks) + 1
    max_blocks = max(nblocks)
    kv = torch.randn(total_blocks, BS, s.num_kv_heads, s.head_size + s.head_size_v, device=device, dtype=dt,
                     generator=g)
    perm = torch.randperm(total_blocks, device=device, generator=g).to(torch.int32)
    table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32, device=device)
    off = 0
    for i, nb in enumerate(nblocks):
        table[i, :nb] = perm[off: off + nb]
        off += nb
    T = sum(q for q, _ in seqs)
    query = torch.randn(T, s.num_heads, s.head_size, device=device, dtype=dt, generator=g)
    out = torch.empty(T, s.num_heads, s.head_size_v, device=device, dtype=dt)
    common = CommonAttentionMetadata.from_seq_lens([q for q, _ in seqs], [q + c for q, c in seqs], table,
                                                   device=device)
    sinks = torch.randn(s.num_heads, device=device, generator=g) if s.sinks else None
    alibi = None
    if s.alibi:
        from diffkv.testing.batches import alibi_slopes_for

        alibi = alibi_slopes_for(s.num_heads).to(device)
    return DeviceBatch(query, kv, common, out, sinks, alibi)


def run_backend(s: Scenario, b: DeviceBatch, backend: str):
    """A zero-argument callable running one forward through the class API."""
    cls = load_backend(backend)
    impl = cls.get_impl_cls()(
        num_heads=s.num_heads, head_size=s.head_size, scale=s.head_size**-0.5, num_kv_heads=s.num_kv_heads,
        alibi_slopes=b.alibi, sliding_window=s.sliding_window, logits_soft_cap=s.softcap, sinks=b.sinks,
        use_alibi_sqrt=s.alibi == "sqrt", head_size_v=s.head_size_v,
    )
    spec = KVCacheSpec(block_size=s.block_size, num_kv_heads=s.num_kv_heads, num_heads=s.num_heads,
                       head_size=s.head_size, head_size_v=s.head_size_v, dtype=getattr(torch, s.dtype),
                       max_num_seqs=max(256, b.common.num_reqs), max_num_batched_tokens=max(8192, b.query.shape[0]))
    builder = cls.get_builder_cls()(spec, b.query.device, num_blocks=b.kv_cache.shape[0])
    md = builder.build(0, b.common)
    return lambda: impl.forward(None, b.query, None, None, b.kv_cache, md, b.out)


def torch_baseline(s: Scenario, b: DeviceBatch):
    """Plain PyTorch: gather pages into dense K/V, then SDPA (uniform batches only)."""
    import torch.nn.functional as F

    seqs = s.seq_list()
    if len({x for x in seqs}) != 1 or s.sinks or s.alibi or s.softcap:
        return None
    q_len, ctx = seqs[0]
    if q_len > 1 and ctx > 0:
        return None
    B, n = len(seqs), q_len + ctx
    nb = math.ceil(n / s.block_size)
    table = b.common.block_table_tensor[:, :nb].long()
    Dqk = s.head_size
    window = s.sliding_window

    def fn():
        kv = b.kv_cache[table].reshape(B, nb * s.block_size, s.num_kv_heads, -1)[:, :n]
        lo = 0 if window is None or q_len > 1 else max(0, n - window)
        k = kv[:, lo:, :, :Dqk].transpose(1, 2)
        v = kv[:, lo:, :, Dqk:].transpose(1, 2)
        q = b.query.view(B, q_len, s.num_heads, Dqk).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=Dqk**-0.5, enable_gqa=True)

    try:
        fn()
    except Exception:  # noqa: BLE001 - a baseline that cannot run is reported as n/a
        return None
    return fn


# -- reporting --------------------------------------------------------------------
def _progress(i: int, n: int, name: str) -> None:
    bar = "#" * (20 * i // n) + "." * (20 - 20 * i // n)
    print(f"[{bar}] {i}/{n} {name}", file=sys.stderr, flush=True)


def first_tokens(s: Scenario) -> list[int]:
    """Per sequence, the first key a decode of this scenario must read (0, or
    the start of the window of its first query)."""
    return [q + c - needed_keys(q, c, s.sliding_window)[0] for q, c in s.seq_list()]


def paged_read_floor(s: Scenario, b: DeviceBatch, flush: str) -> tuple[float, str]:
    """(ms, configuration) of the fastest plain read of the K/V this decode
    scenario must read, through its block table (:mod:`diffkv.read_floor`),
    each configuration timed like the scenarios (graph replay, same flush)."""
    from diffkv.read_floor import paged_read_floor_ms

    dev = b.query.device
    first = torch.tensor(first_tokens(s), dtype=torch.int32, device=dev)

    def timer(fn):
        fn()
        return time_fn(as_graph(fn) or fn, reps_ms=100, flush=flush)[0]
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    return paged_read_floor_ms(b.kv_cache, b.common.block_table_tensor, b.common.seq_lens, first, timer, sms)


def run(scenarios: list[Scenario], backend: str, device: torch.device, with_baseline: bool = True,
        graphs: bool = True, flush: str = "read") -> dict:
    gpu = torch.cuda.get_device_name(device)
    print(f"diffkv bench on {gpu} (torch {torch.__version__}, backend {backend})", flush=True)
    print("measuring ceilings ...", file=sys.stderr, flush=True)
    ceil = measure_ceilings(device, flush=flush)
    print(f"ceilings on {gpu}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} "
          "TFLOP/s", flush=True)
    results = []
    for i, s in enumerate(scenarios):
        _progress(i, len(scenarios), s.name)
        b = build_batch(s, device)
        fn = run_backend(s, b, backend)
        with launch_trace(backend) as launched:
            fn()
        torch.cuda.synchronize(device)
        replay = as_graph(fn) if graphs else None
        med, p20, p80 = time_fn(replay or fn, flush=flush)
        base = torch_baseline(s, b) if with_baseline else None
        base_replay = as_graph(base) if (graphs and base is not None) else None
        base_ms = time_fn(base_replay or base, flush=flush)[0] if base is not None else None
        nbytes, flops = workload(s)
        floor_ms, floor_cfg = paged_read_floor(s, b, flush) if s.kind == "decode" else (None, None)
        r = {
            "scenario": s.name, "kind": s.kind, "note": s.note, "config": asdict(s),
            "ms_median": med, "ms_p20": p20, "ms_p80": p80,
            "bytes": nbytes, "flops": flops,
            "GBps": nbytes / (med * 1e-3) / 1e9, "TFLOPs": flops / (med * 1e-3) / 1e12,
            "torch_baseline_ms": base_ms,
            "paged_read_ms": floor_ms,
            "paged_read_config": floor_cfg,
            "frac_floor": (floor_ms / med) if floor_ms else None,
            "timing": "cuda_graph_replay" if replay else "eager",
            "kernels": list(launched),
        }
        r["frac_copy"] = r["GBps"] / ceil["copy_GBps"]
        r["frac_matmul"] = r["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
        results.append(r)
        del b, fn, base
        torch.cuda.empty_cache()
    _progress(len(scenarios), len(scenarios), "done")
    by_name = {r["scenario"]: r for r in results}
    for r in results:
        parts = SCENARIOS.get(r["scenario"], Scenario("", (), "")).parts
        if parts and all(p in by_name for p in parts):
            r["parts_ms"] = sum(by_name[p]["ms_median"] for p in parts)
    return {"gpu": gpu, "torch": torch.__version__, "triton": _triton_version(), "backend": backend,
            "host": platform.node(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "flush": flush, "ceilings": ceil, "results": results}


def launch_trace(backend: str):
    """A context recording which kernels one forward launches: the Triton
    backend's :func:`~diffkv.triton.kernels.attention.trace_launches`; other
    backends record nothing."""
    if backend == "triton":
        from diffkv.triton.kernels.attention import trace_launches

        return trace_launches()
    return contextlib.nullcontext([])


def _triton_version() -> str:
    import triton

    return triton.__version__


def whole_context_read_ms(r: dict, copy_gbps: float) -> float:
    """Time to read the bytes a windowed scenario would need *without* its
    window (the whole context) at the copy ceiling: a kernel faster than this
    cannot be reading the whole context."""
    cfg = dict(r["config"])
    cfg.update(seqs=tuple(tuple(g) for g in cfg["seqs"]), parts=tuple(cfg.get("parts") or ()), sliding_window=None)
    nbytes, _ = workload(Scenario(**cfg))
    return nbytes / (copy_gbps * 1e9) * 1e3


def verdict(r: dict, ceilings: dict | None = None) -> str:
    if r["kind"] == "decode" and (r.get("config") or {}).get("sliding_window") and ceilings:
        # issue #6: the windowed decode must be bound by the bytes of its window, not of the context
        whole = whole_context_read_ms(r, ceilings["copy_GBps"])
        return (f"{'MET' if r['ms_median'] < whole else 'miss'} (window-bound: < {whole:.3f} ms, "
                f"the whole context at copy BW)")
    if r["kind"] == "decode":
        t = TARGETS["decode"]
        return f"{'MET' if r['frac_copy'] >= t else 'miss'} (>= {t:.0%} copy)"
    if r["kind"] == "prefill" and not r["scenario"].startswith("mixed."):
        t = TARGETS["prefill"]
        return f"{'MET' if r['frac_matmul'] >= t else 'miss'} (>= {t:.0%} matmul)"
    if "parts_ms" in r:
        return f"{'MET' if r['ms_median'] <= r['parts_ms'] else 'miss'} (<= parts {r['parts_ms']:.3f} ms)"
    return ""


def print_table(report: dict) -> None:
    c = report["ceilings"]
    timing = {r["timing"] for r in report["results"]}
    print(f"\n{report['gpu']}: copy ceiling {c['copy_GBps']:.0f} GB/s, bf16 matmul ceiling "
          f"{c['bf16_matmul_TFLOPs']:.0f} TFLOP/s, backend {report['backend']}, timed as "
          f"{' / '.join(sorted(timing))}, L2 flushed before each run by a {report.get('flush', 'write')}")
    print("%floor: a plain read of the same K/V (each needed byte once, through the block table, fastest of 9 "
          "launch configurations) takes this fraction of the scenario's time")
    hdr = f"{'scenario':<28} {'median ms':>9} {'p20-p80':>15} {'GB/s':>7} {'%copy':>6} {'%floor':>6} " \
          f"{'TFLOP/s':>8} {'%mm':>5} {'torch ms':>9}  target"
    print(hdr)
    print("-" * len(hdr))
    for r in report["results"]:
        base = f"{r['torch_baseline_ms']:.3f}" if r["torch_baseline_ms"] is not None else "n/a"
        rd = f"{r['frac_floor']:.1%}" if r.get("frac_floor") else "-"
        print(f"{r['scenario']:<28} {r['ms_median']:>9.4f} {r['ms_p20']:>7.4f}-{r['ms_p80']:<7.4f} "
              f"{r['GBps']:>7.0f} {r['frac_copy']:>6.1%} {rd:>6} {r['TFLOPs']:>8.1f} {r['frac_matmul']:>5.1%} "
              f"{base:>9}  {verdict(r, c)}")
    traced = [r for r in report["results"] if r.get("kernels")]
    if traced:
        print("kernels launched by one forward:")
        for r in traced:
            print(f"  {r['scenario']:<28} {' | '.join(r['kernels'])}")


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'diffkv[plot]')", file=sys.stderr)
        return False
    rs = [r for r in report["results"] if r["kind"] in ("decode", "prefill")]
    names = [r["scenario"] for r in rs]
    vals = [r["frac_copy"] if r["kind"] == "decode" else r["frac_matmul"] for r in rs]
    colors = ["tab:blue" if r["kind"] == "decode" else "tab:orange" for r in rs]
    fig, ax = plt.subplots(figsize=(14, 5))
    ax.bar(range(len(rs)), vals, color=colors)
    for i, r in enumerate(rs):
        t = TARGETS.get(r["kind"]) if not r["scenario"].startswith("mixed.") else None
        if t and not r["scenario"].startswith("decode_b64_8k_win"):
            ax.hlines(t, i - 0.4, i + 0.4, colors="red", linestyles="--")
        for j, (peer, v) in enumerate(PEERS.get(r["scenario"], {}).items()):
            ax.plot(i, v, marker="_x"[j % 2], color="black", markersize=12)
        ax.text(i, vals[i] / 2, f"{vals[i]:.1%}", ha="center", fontsize=8, color="white",
                fontweight="bold")
        if r.get("paged_read_ms"):  # a plain read of the same K/V, as a fraction of copy
            rd = r["bytes"] / (r["paged_read_ms"] * 1e-3) / 1e9 / report["ceilings"]["copy_GBps"]
            ax.plot(i, rd, marker="o", color="gray", markersize=6)
    ax.set_xticks(range(len(rs)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fraction of ceiling (decode: copy BW, prefill: bf16 matmul)")
    c = report["ceilings"]
    ax.set_title(f"diffkv on {report['gpu']}: ceilings measured in this run -- copy {c['copy_GBps']:.0f} GB/s, "
                 f"bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s ({', '.join(sorted({r['timing'] for r in rs}))}, "
                 f"L2 flush: {report.get('flush', '?')})", fontsize=9)
    ax.set_ylim(0, 1.1)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    legend = [
        Patch(color="tab:blue", label="decode: fraction of copy bandwidth"),
        Patch(color="tab:orange", label="prefill: fraction of bf16 matmul"),
        Line2D([], [], color="red", linestyle="--", label="target (issue #6)"),
        Line2D([], [], color="black", marker="_", linestyle="", markersize=12,
               label="vLLM Triton DiffKV (SPEC section 8, H100)"),
        Line2D([], [], color="black", marker="x", linestyle="", markersize=9,
               label="best peer (SPEC section 8, H100)"),
        Line2D([], [], color="gray", marker="o", linestyle="", markersize=6,
               label="plain read of the same K/V pages (this run)"),
    ]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenarios", nargs="*", help=f"named scenarios (default: all): {', '.join(SCENARIOS)}")
    p.add_argument("--backend", default="triton")
    p.add_argument("--seqs", help="custom scenario: N x Q @ CTX groups, e.g. 1x2048@2048,62x1@4096")
    p.add_argument("--heads", default="32/4", help="H/Hkv of the custom scenario")
    p.add_argument("--head-sizes", default="192/128", help="Dqk/Dv of the custom scenario")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--sinks", action="store_true")
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--alibi", choices=["linear", "sqrt"], default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the gather + SDPA baseline")
    p.add_argument("--eager", action="store_true",
                   help="time eager calls (Python launch overhead included) instead of CUDA-graph replays")
    p.add_argument("--flush", choices=FLUSH_MODES, default="read",
                   help="how L2 is flushed before each run: read 256 MB (default; L2 left clean) or write 256 MB "
                        "of zeros as triton's do_bench does (L2 left dirty: its write-back lands in the timing)")
    p.add_argument("--json", default="bench.json", help="where to write the JSON report")
    p.add_argument("--plot", default="bench.png", help="where to write the PNG plot ('' = none)")
    p.add_argument("--from-json", metavar="PATH",
                   help="print the table and draw the plot of an earlier run's JSON report; runs nothing "
                        "(works without a GPU)")


def main(args: argparse.Namespace) -> int:
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        print_table(report)
        if args.plot and plot(report, args.plot):
            print(f"plot written to {args.plot}")
        return 0
    if not torch.cuda.is_available():
        print("diffkv bench needs a CUDA GPU (it measures the GPU's ceilings); none is visible", file=sys.stderr)
        return 2
    scenarios = [SCENARIOS[n] for n in args.scenarios] if args.scenarios else (
        [] if args.seqs else list(SCENARIOS.values()))
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    if args.seqs:
        h, hkv = (int(x) for x in args.heads.split("/"))
        dqk, dv = (int(x) for x in args.head_sizes.split("/"))
        groups = parse_seqs(args.seqs)
        kinds = {"decode" if q == 1 else "prefill" for _, q, _ in groups}
        scenarios.append(Scenario("custom", groups, kinds.pop() if len(kinds) == 1 else "mixed", num_heads=h,
                                  num_kv_heads=hkv, head_size=dqk, head_size_v=dv, block_size=args.block_size,
                                  dtype=args.dtype, sliding_window=args.window, sinks=args.sinks,
                                  softcap=args.softcap, alibi=args.alibi))
    report = run(scenarios, args.backend, torch.device("cuda"), with_baseline=not args.no_baseline,
                 graphs=not args.eager, flush=args.flush)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"JSON written to {args.json}")
    if args.plot and plot(report, args.plot):
        print(f"plot written to {args.plot}")
    return 0


__all__ = ["SCENARIOS", "Scenario", "main", "run", "workload"]
