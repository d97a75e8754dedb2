"""Launch heuristics of the Triton attention kernels.

Everything the host decides before a launch lives here, as plain functions of
*shapes* and *host integers* (never of device values, so the forward stays
free of host syncs and CUDA-graph capturable):

* tile sizes, ``num_warps`` / ``num_stages``: looked up in
  :data:`TUNED_CONFIGS`, a table kept in the repository (no autotuning at
  import or on the hot path). Keys are ``(arch, regime, dtype)`` with optional
  per-``(Dqk, Dv)`` refinements; the lead tunes the numbers, the structure
  stays.
* the split of the Q/K head dim into a power-of-two chunk plus a remainder
  chunk (192 = 128 + 64), so no compute is spent padding 192 up to 256;
* GQA packing: one program serves one KV head and a tile of
  ``BLOCK_Q query tokens x G_TILE query heads`` rows, so each K/V tile is
  loaded once per KV head (``G_TILE`` = all ``H / Hkv`` heads up to 128);
* the number of KV splits (flash-decoding) from the SM count, the number of
  programs and the KV length, bounded by the preallocated workspace.

Regimes: ``decode`` when every sequence has at most
:data:`DECODE_MAX_QUERY_LEN` new tokens (single-token and speculative
decodes; rows per program sized to the queries), else ``prefill``; a prefill
read from the gathered K/V copy whose queries have at most
:data:`SHORT_PREFILL_MAX_QUERY_LEN` tokens uses the ``prefill_short`` entries
where there are any.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

DECODE_MAX_QUERY_LEN = 8
"""Batches whose longest query has at most this many tokens use the decode
tile table (small row tiles, more KV splits)."""

MAX_SPLITS = 64
"""Upper bound of KV splits per (query tile, KV head)."""

MAX_G_TILE = 128
"""At most this many query heads of one KV head share a program."""

SPLIT_ROW_BUDGET = 2048
"""Workspace capacity in (query token x split) rows: the builder allocates
``SPLIT_ROW_BUDGET x H x Dv`` fp32 partial outputs (plus two ``x H`` fp32
vectors). ``T x num_splits`` never exceeds it (e.g. one 32k decode with 64
splits uses 64 rows; 16 decodes x 4 draft tokens x 32 splits use 2048)."""

TARGET_WAVES = 2
"""Split until about this many waves of programs fill the SMs."""

INTERPRETER_NUM_SMS = 8
"""Pretend SM count under the Triton interpreter (so CPU tests exercise the
split path through the ordinary heuristics)."""


@dataclass(frozen=True)
class TileConfig:
    """One tuned entry.

    Attributes:
        block_m: rows (query tokens x heads) per program; in the decode regime
            an upper bound (rows are sized to the longest query).
        block_n: KV tokens per tile (a tile may span several cache pages).
        num_warps, num_stages: Triton launch options.
        min_tiles_per_split: a KV split gets at least this many tiles.
        max_g_tile: at most this many query heads of one KV head share a
            program (GQA packing); 1 = one head per program, all rows from
            consecutive query tokens.
        preload_tiles: decode regime: read the block table ahead in chunks of
            this many KV tiles, so the KV loop has no dependent load and
            pipelines ``num_stages`` deep (0: read it tile by tile; Triton
            then prefetches one tile only).
        gathered_block_n, gathered_stages: prefill regime, > 0: where the
            workspace has room, the served sequences' K/V rows are first copied
            into one contiguous buffer and read through tensor descriptors with
            these KV tiles and pipeline depth (0: always the paged path).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    min_tiles_per_split: int = 4
    max_g_tile: int = 128
    preload_tiles: int = 8
    gathered_block_n: int = 0
    gathered_stages: int = 0


# (arch, regime, dtype class, head class) -> TileConfig, refined by
# (arch, regime, dtype class, Dqk, Dv).
# arch: "sm90" (Hopper), "sm80" (Ampere/Ada and the default), "interpreter".
# dtype class: "16bit" (fp16/bf16) or "fp32" (full-precision FMA dots: small
# tiles, no spills). head class: "big" when max(Dqk, Dv) > 192, else "small".
# Entries were checked for register spills with ptxas (sm_90a): none spill.
TUNED_CONFIGS: dict[tuple, TileConfig] = {
    ("sm90", "prefill", "16bit", "small"): TileConfig(128, 128, 8, 2, gathered_block_n=64, gathered_stages=3),
    ("sm90", "decode", "16bit", "small"): TileConfig(64, 64, 4, 3, 4, preload_tiles=8),
    ("sm90", "prefill", "16bit", "big"): TileConfig(64, 32, 4, 2),
    ("sm90", "decode", "16bit", "big"): TileConfig(64, 32, 4, 3),
    ("sm90", "prefill", "fp32", "small"): TileConfig(16, 16, 4, 1),
    ("sm90", "decode", "fp32", "small"): TileConfig(16, 16, 4, 1),
    ("sm90", "prefill", "fp32", "big"): TileConfig(16, 16, 4, 1),
    ("sm90", "decode", "fp32", "big"): TileConfig(16, 16, 4, 1),
    ("sm90", "prefill", "16bit", 192, 128): TileConfig(128, 128, 8, 2, gathered_block_n=64, gathered_stages=3),
    # gathered prefill of queries <= SHORT_PREFILL_MAX_QUERY_LEN: 64-row programs, two per SM (exp13)
    ("sm90", "prefill_short", "16bit", "small"): TileConfig(64, 128, 4, 2, gathered_block_n=64, gathered_stages=2),
    ("sm90", "prefill_short", "16bit", 192, 128): TileConfig(64, 128, 4, 2, gathered_block_n=64, gathered_stages=2),
    ("sm90", "decode", "16bit", 192, 128): TileConfig(64, 64, 4, 3, 4, preload_tiles=8),
    ("sm80", "prefill", "16bit", "small"): TileConfig(64, 64, 4, 2),
    ("sm80", "decode", "16bit", "small"): TileConfig(64, 64, 4, 2),
    ("sm80", "prefill", "16bit", "big"): TileConfig(64, 32, 4, 2),
    ("sm80", "decode", "16bit", "big"): TileConfig(64, 32, 4, 2),
    ("sm80", "prefill", "fp32", "small"): TileConfig(16, 16, 4, 1),
    ("sm80", "decode", "fp32", "small"): TileConfig(16, 16, 4, 1),
    ("sm80", "prefill", "fp32", "big"): TileConfig(16, 16, 4, 1),
    ("sm80", "decode", "fp32", "big"): TileConfig(16, 16, 4, 1),
    ("interpreter", "prefill", "16bit", "small"): TileConfig(32, 16, 4, 1, 1, gathered_block_n=16, gathered_stages=1),
    ("interpreter", "decode", "16bit", "small"): TileConfig(16, 16, 4, 1, 1, preload_tiles=2),
    ("interpreter", "prefill", "fp32", "small"): TileConfig(32, 16, 4, 1, 1),
    ("interpreter", "decode", "fp32", "small"): TileConfig(16, 16, 4, 1, 1, preload_tiles=2),
}


@dataclass(frozen=True)
class LaunchPlan:
    """Everything one attention launch needs besides tensors.

    Attributes:
        block_q: query tokens per program.
        g_tile: query heads (of one KV head) per program (power of two).
        num_g_tiles: programs per KV head along the head axis (1 unless G > 128).
        block_m: rows per program = block_q * g_tile (>= 16).
        block_n: KV tokens per tile.
        d1, d2: the Q/K head dim as a power-of-two chunk plus a padded
            remainder chunk (d2 = 0: one chunk).
        dv_pad: next power of two of Dv.
        num_splits: KV splits (1 = single pass, writes the output directly).
        splits_pad: next power of two of num_splits (reduce kernel).
        num_warps, num_stages: attention kernel launch options.
        phased: visit interior KV tiles through the mask-free path (prefill
            regime; decode programs visit few tiles, one masked loop is faster).
        preload_tiles: unphased loop: block-table entries read ahead in
            chunks of this many tiles (0: tile by tile).
        gathered: K/V come from the contiguous gathered copy through tensor
            descriptors (prefill regime).
    """

    block_q: int
    g_tile: int
    num_g_tiles: int
    block_m: int
    block_n: int
    d1: int
    d2: int
    dv_pad: int
    num_splits: int
    splits_pad: int
    num_warps: int
    num_stages: int
    phased: bool = True
    preload_tiles: int = 0
    gathered: bool = False


SHORT_PREFILL_MAX_QUERY_LEN = 2048
"""Gathered prefills whose longest query has at most this many tokens use the
``prefill_short`` entries (64-row programs, two per SM): measured faster at
2k-token queries, slower at 8k (perf/exp13.py, H100)."""

WINDOW_DECODE_BLOCK_N = 64
"""KV tile of windowed decodes: a window of W keys straddles at most
``W + BLOCK_N - 1`` keys of tiles, so small tiles keep the bytes read close to
the window's own."""

SHORT_WINDOW = 256
"""sm_90: decodes of layers whose window has at most this many keys use
:data:`SHORT_WINDOW_BLOCK_N`-key tiles, :data:`SHORT_WINDOW_STAGES` stages
(perf/exp19.py, H100, window 128 + sinks, B=64 x 8k: 28.2 -> 25.9 us; the
same small tiles are 20-30 % slower on whole contexts)."""

SHORT_WINDOW_BLOCK_N = 16
SHORT_WINDOW_STAGES = 4


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n.bit_length() - 1)


def split_head_dim(head_size: int) -> tuple[int, int]:
    """``(d1, d2)``: a power-of-two chunk and a padded remainder chunk whose
    dot products sum to the full ``q . k``.

    192 -> (128, 64); 96 -> (64, 32); 160 -> (128, 32); 128 -> (128, 0).
    Where the padded remainder would cost as much as padding the whole dim
    (224 -> 128 + 128), one padded chunk is used instead: (256, 0).
    """
    d1 = prev_pow2(head_size)
    rem = head_size - d1
    if rem == 0:
        return d1, 0
    d2 = max(16, next_pow2(rem))
    if d1 + d2 >= next_pow2(head_size):
        return next_pow2(head_size), 0
    return d1, d2


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def lookup_config(arch: str, regime: str, dtype: torch.dtype, head_size: int, head_size_v: int,
                  default: str | None = "sm80") -> TileConfig | None:
    """The tuned entry for this case: the per-(Dqk, Dv) refinement if any,
    else the (arch, regime, dtype class, head class) entry; the interpreter
    ignores head classes and unknown archs fall back to ``default`` ("sm80";
    None: no fallback, None is returned)."""
    dc = dtype_class(dtype)
    cfg = TUNED_CONFIGS.get((arch, regime, dc, head_size, head_size_v))
    if cfg is not None:
        return cfg
    head_class = "big" if max(head_size, head_size_v) > 192 and arch != "interpreter" else "small"
    cfg = TUNED_CONFIGS.get((arch, regime, dc, head_class))
    if cfg is None and default is not None:
        cfg = TUNED_CONFIGS[(default, regime, dc, head_class)]
    return cfg


@functools.lru_cache(maxsize=4096)
def plan_attention(
    *,
    num_tokens: int,
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    head_size_v: int,
    dtype: torch.dtype,
    max_query_len: int,
    max_seq_len: int,
    arch: str,
    num_sms: int,
    max_splits: int,
    num_splits: int | None = None,
    sliding_window: int | None = None,
    block_size: int = 16,
    gathered: bool = False,
) -> LaunchPlan:
    """Choose tiles and the KV split count.

    Args:
        num_tokens: query rows (``query.shape[0]``; bounds the grid).
        num_seqs: sequences in the batch.
        max_query_len, max_seq_len: host upper bounds of the batch (metadata
            host ints, or shape-derived bounds); they only steer performance.
        arch: key of :data:`TUNED_CONFIGS` (see :func:`device_arch`).
        num_sms: streaming multiprocessors of the device.
        max_splits: most splits the workspace holds for ``num_tokens`` rows
            (1 = no workspace, single pass).
        num_splits: force a split count (tests, tuning); clamped to
            ``max_splits``.
        sliding_window: W keys, if the layer has a window (decode tiles
            shrink so the bytes read stay close to the window's).
        block_size: cache page size (block-table read-ahead needs tiles and
            pages that nest: one divides the other).
        gathered: the caller can gather K/V into a contiguous buffer and read
            it through tensor descriptors; the plan uses it where the tuned
            entry has a ``gathered_block_n`` (prefill regime).
    """
    G = num_heads // num_kv_heads
    regime = "decode" if max_query_len <= DECODE_MAX_QUERY_LEN else "prefill"
    cfg = lookup_config(arch, regime, dtype, head_size, head_size_v)
    if regime == "prefill" and gathered and max_query_len <= SHORT_PREFILL_MAX_QUERY_LEN:
        short = lookup_config(arch, "prefill_short", dtype, head_size, head_size_v, default=None)
        cfg = short or cfg
    g_pad = next_pow2(G)
    g_tile = min(g_pad, MAX_G_TILE, cfg.max_g_tile)
    num_g_tiles = math.ceil(G / g_tile)
    if regime == "decode":
        want_q = next_pow2(max(1, max_query_len))
        block_m = max(16, min(max(cfg.block_m, g_tile), g_tile * want_q))
    else:
        block_m = max(16, cfg.block_m, g_tile)
    block_q = max(1, block_m // g_tile)
    block_m = block_q * g_tile
    if block_m < 16:  # tl.dot needs at least 16 rows
        block_q = 16 // g_tile
        block_m = 16
    d1, d2 = split_head_dim(head_size)
    block_n = cfg.block_n
    num_stages = cfg.num_stages
    use_gathered = bool(gathered and regime == "prefill" and cfg.gathered_block_n > 0)
    if use_gathered:
        block_n, num_stages = cfg.gathered_block_n, cfg.gathered_stages
    if regime == "decode" and sliding_window is not None:
        if arch == "sm90" and sliding_window <= SHORT_WINDOW and block_n > SHORT_WINDOW_BLOCK_N:
            block_n, num_stages = SHORT_WINDOW_BLOCK_N, SHORT_WINDOW_STAGES
        elif sliding_window <= 16 * WINDOW_DECODE_BLOCK_N:
            block_n = min(block_n, WINDOW_DECODE_BLOCK_N)

    if num_splits is None:
        q_tiles = min(num_seqs * math.ceil(max(1, max_query_len) / block_q), num_tokens // block_q + num_seqs)
        programs = max(1, q_tiles * num_kv_heads * num_g_tiles)
        kv_tiles = math.ceil(max(1, max_seq_len) / block_n)
        target = num_sms * TARGET_WAVES
        splits = 1
        if programs < num_sms:  # less than one wave: split (measured: at ~2 waves splitting only adds the reduce)
            splits = min(math.ceil(target / programs), kv_tiles // max(1, cfg.min_tiles_per_split), MAX_SPLITS)
            splits = prev_pow2(max(1, splits))
    else:
        splits = max(1, int(num_splits))
    splits = max(1, min(splits, max_splits))
    preload = next_pow2(cfg.preload_tiles) if cfg.preload_tiles > 0 else 0
    return LaunchPlan(
        block_q=block_q,
        g_tile=g_tile,
        num_g_tiles=num_g_tiles,
        block_m=block_m,
        block_n=block_n,
        d1=d1,
        d2=d2,
        dv_pad=next_pow2(head_size_v),
        num_splits=splits,
        splits_pad=next_pow2(splits),
        num_warps=cfg.num_warps,
        num_stages=num_stages,
        phased=regime == "prefill",
        gathered=use_gathered,
        preload_tiles=preload if regime == "decode" and (block_n % block_size == 0 or block_size % block_n == 0) else 0,
    )


@dataclass(frozen=True)
class GluonDecodeRule:
    """When the Gluon decode serves a decode launch, and how far it splits,
    by card: it serves launches of ``min_programs`` to ``num_sms *
    max_sm_fraction`` (query tile, KV head) programs and splits their KV
    until they number about ``num_sms * target_sm_fraction``."""

    min_programs: int
    max_sm_fraction: float
    target_sm_fraction: float


GLUON_DECODE_RULES: dict[str, GluonDecodeRule] = {
    # H100 SXM (perf/exp31.py, bf16, H=32, Hkv=4): one program streams at
    # most ~55 GB/s, so ~64 of them saturate HBM; more programs only add
    # partials to reduce -- B=16 x 8k: 64 programs unsplit 120.6 us, 128
    # programs 127.8 us; B=1 x 32k: 16 splits 39.8 us, 32 splits 41.7 us;
    # B=2 / 4 / 8 best at 64 programs too. From 128 programs on (B=32 x 8k,
    # B=64 x 4k) the Triton decode is as fast or faster (two programs per SM).
    "default": GluonDecodeRule(min_programs=1, max_sm_fraction=0.5, target_sm_fraction=0.5),
    # H200 (perf/exp37, perf/logs/exp37_h200.log; 4.2 TB/s of copy): best at
    # ~96-132 programs -- B=16 x 8k: 64 programs 102.0 us, 128 programs
    # 91.7 us (Triton 93.3); B=32 x 8k unsplit (128) 167.0 us (Triton 170.4);
    # B=2 / 4 / 8 best at 96-128 programs, 2-5 % ahead of Triton; B=1 x 32k
    # (4 programs): 32.4-32.6 us at 96-132 programs, Triton 30.8 us;
    # B=64 x 4k (256) and 62 x 4k (248): Triton level or ahead.
    "H200": GluonDecodeRule(min_programs=8, max_sm_fraction=1.0, target_sm_fraction=1.0),
}
"""Tuned per card (the key: a substring of the CUDA device name; "default":
every other card, tuned on an H100)."""

GLUON_DECODE_MIN_SPLIT_KEYS = 512
"""A split of the Gluon decode reads at least this many keys (fewer: the
ring's fill and the partial's write dominate)."""


def gluon_decode_rule(device_name: str) -> GluonDecodeRule:
    """The :data:`GLUON_DECODE_RULES` entry for a CUDA device name."""
    for key, rule in GLUON_DECODE_RULES.items():
        if key != "default" and key in device_name:
            return rule
    return GLUON_DECODE_RULES["default"]


def gluon_decode_fits(programs: int, num_sms: int, rule: GluonDecodeRule = GLUON_DECODE_RULES["default"]) -> bool:
    """The Gluon decode is the faster kernel for a launch of this many
    (query tile, KV head) programs on a card with ``rule``."""
    return rule.min_programs <= programs <= max(1, int(num_sms * rule.max_sm_fraction))


def plan_gluon_decode(*, programs: int, kv_tiles: int, num_sms: int, max_splits: int,
                      num_splits: int | None = None, tile_keys: int = 64,
                      rule: GluonDecodeRule = GLUON_DECODE_RULES["default"]) -> int:
    """KV splits of the Gluon decode: until the programs number about
    ``num_sms * rule.target_sm_fraction``, no split shorter than
    :data:`GLUON_DECODE_MIN_SPLIT_KEYS` keys, at most :data:`MAX_SPLITS`;
    clamped to the workspace's ``max_splits`` (forced ``num_splits`` too)."""
    if num_splits is None:
        target = max(1, int(num_sms * rule.target_sm_fraction))
        min_tiles = max(1, GLUON_DECODE_MIN_SPLIT_KEYS // tile_keys)
        num_splits = min(max(1, target // max(1, programs)), max(1, kv_tiles // min_tiles), MAX_SPLITS)
    return max(1, min(int(num_splits), max_splits))


@functools.lru_cache(maxsize=64)
def _cuda_props(index: int) -> tuple[int, int, str]:
    """(compute capability as one number, SM count, name) of a CUDA device."""
    p = torch.cuda.get_device_properties(index)
    return p.major * 10 + p.minor, p.multi_processor_count, p.name


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def device_name(device: torch.device) -> str:
    """A CUDA device's name (``"NVIDIA H200"``), for per-card tuned rules."""
    return _cuda_props(_cuda_index(device))[2]


def compute_capability(device: torch.device) -> int:
    """A CUDA device's compute capability as one number (90 for sm_90)."""
    return _cuda_props(_cuda_index(device))[0]


def device_arch(device: torch.device, interpreted: bool) -> tuple[str, int]:
    """``(arch key, SM count)`` for :func:`plan_attention`: ``"sm90"`` for
    every compute capability from 9.0 up (tensor descriptors / TMA), else
    ``"sm80"``."""
    if interpreted or device.type != "cuda":
        return "interpreter", INTERPRETER_NUM_SMS
    cc, sms, _ = _cuda_props(_cuda_index(device))
    return ("sm90" if cc >= 90 else "sm80"), sms


GATHER_ROW_BUDGET = 32768
"""Tokens of K/V a builder's gather buffer holds (contiguous copy of the
prefill sequences' rows, read through tensor descriptors): ``max(this,
max_num_batched_tokens)`` rows of ``Hkv * (Dqk + Dv)`` 16-bit values (84 MB at
Hkv=4, Dqk=192, Dv=128). Prefill batches whose K/V do not fit take the paged
path."""


def gather_rows_capacity(max_num_batched_tokens: int) -> int:
    """Rows of the K/V gather buffer a builder preallocates."""
    return max(GATHER_ROW_BUDGET, max_num_batched_tokens)


def split_rows_capacity(max_num_batched_tokens: int) -> int:
    """Rows (token x split) of the workspace a builder preallocates."""
    return max(MAX_SPLITS, min(SPLIT_ROW_BUDGET, max(1, max_num_batched_tokens) * MAX_SPLITS))
