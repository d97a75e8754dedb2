"""Argument checks shared by every backend and entry point.

Two levels:

* ``check_*_inputs`` look only at ranks, shapes, dtypes and devices -- host
  metadata of tensors, never their values -- so they cost no device sync and
  are safe in the hot path (CUDA-graph capturable).
* :func:`check_metadata_values` reads metadata *values* from host copies; the
  metadata builder and the functional API call it, the forward never does.

Every error names the argument, what was received and what was expected.
"""

from __future__ import annotations

import math

import torch

from diffkv.errors import DeviceError, DTypeError, InvalidInputError, MetadataError, ShapeError

__all__ = [
    "InvalidInputError",
    "check_layer_config",
    "check_per_head_vector",
    "check_attention_inputs",
    "check_cache_write_inputs",
    "check_metadata_values",
    "check_query_start_loc_values",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    return t


def _require_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ShapeError(f"{name} has shape {_shape(t)} (rank {t.dim()}); expected rank {rank}: {layout}")


def _require_int(name: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name}={value!r}; expected an int")
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{name}={value}; expected an int >= {minimum}")
    return value


def check_layer_config(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    head_size_v: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> None:
    """Malformed layer parameters raise ``InvalidInputError``."""
    _require_int("num_heads", num_heads, minimum=1)
    _require_int("num_kv_heads", num_kv_heads, minimum=1)
    _require_int("head_size", head_size, minimum=1)
    _require_int("head_size_v", head_size_v, minimum=1)
    if num_heads % num_kv_heads != 0:
        raise ShapeError(
            f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}; "
            "each KV head must serve the same number of query heads"
        )
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInputError(f"scale={scale!r}; expected a finite float")
    if sliding_window is not None:
        _require_int("sliding_window", sliding_window, minimum=1)
    if logits_soft_cap is not None and (
        not isinstance(logits_soft_cap, (int, float)) or not math.isfinite(logits_soft_cap) or logits_soft_cap < 0
    ):
        raise InvalidInputError(
            f"logits_soft_cap={logits_soft_cap!r}; expected None, 0 (off) or a finite positive float"
        )


def check_per_head_vector(name: str, t: object, num_heads: int, device: torch.device | None = None) -> None:
    """``alibi_slopes`` / ``sinks``: a float tensor ``[H]``."""
    t = _require_tensor(name, t)
    if t.dim() != 1 or t.shape[0] != num_heads:
        raise ShapeError(f"{name} has shape {_shape(t)}; expected [{num_heads}] (one value per query head)")
    if t.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{name} has dtype {t.dtype}; expected a floating dtype (float32 preferred)")
    if device is not None and t.device.type != device.type:
        raise DeviceError(f"{name} is on {t.device}; expected the device of query ({device})")


def check_attention_inputs(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    output: torch.Tensor | None,
    *,
    head_size_v: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Shape/dtype/device checks of one attention call. No value is read.

    Returns ``(head_size, head_size_v)`` (Dqk, Dv).
    """
    query = _require_tensor("query", query)
    kv_cache = _require_tensor("kv_cache", kv_cache)
    _require_rank("query", query, 3, "[num_tokens, num_heads, head_size]")
    _require_rank("kv_cache", kv_cache, 4, "[num_blocks, block_size, num_kv_heads, head_size + head_size_v]")
    T, H, Dqk = query.shape
    NB, BS, Hkv, D = kv_cache.shape
    if query.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"query has dtype {query.dtype}; expected float16, bfloat16 or float32")
    if num_heads is not None and H != num_heads:
        raise ShapeError(f"query has shape {_shape(query)}; expected num_heads={num_heads} in dim 1")
    if num_kv_heads is not None and Hkv != num_kv_heads:
        raise ShapeError(f"kv_cache has shape {_shape(kv_cache)}; expected num_kv_heads={num_kv_heads} in dim 2")
    if Hkv == 0 or H % Hkv != 0:
        raise ShapeError(
            f"query has {H} heads and kv_cache has {Hkv} KV heads (shapes {_shape(query)}, {_shape(kv_cache)}); "
            "expected num_heads to be a positive multiple of num_kv_heads"
        )
    if D <= Dqk:
        raise ShapeError(
            f"kv_cache has last dim {D} and query has head_size {Dqk}; expected kv_cache.shape[-1] = "
            "head_size + head_size_v with head_size_v >= 1"
        )
    Dv = D - Dqk
    if head_size_v is not None and Dv != head_size_v:
        raise ShapeError(
            f"kv_cache has last dim {D} = head_size {Dqk} + {Dv}; expected head_size + head_size_v = "
            f"{Dqk} + {head_size_v} = {Dqk + head_size_v}"
        )
    if kv_cache.stride(-1) != 1:
        raise ShapeError(f"kv_cache has stride {kv_cache.stride(-1)} in its last dim; expected 1 (contiguous rows)")
    if query.stride(-1) != 1:
        raise ShapeError(f"query has stride {query.stride(-1)} in its last dim; expected 1")
    if kv_cache.dtype != query.dtype:
        raise DTypeError(
            f"kv_cache has dtype {kv_cache.dtype} but query has {query.dtype}; expected the same dtype "
            "(quantized caches are configured with kv_cache_dtype)"
        )
    dev = query.device
    for name, t in (("kv_cache", kv_cache),):
        if t.device != dev:
            raise DeviceError(f"{name} is on {t.device}; expected the device of query ({dev})")
    # metadata tensors
    query_start_loc = _require_tensor("query_start_loc", query_start_loc)
    seq_lens = _require_tensor("seq_lens", seq_lens)
    block_table = _require_tensor("block_table", block_table)
    _require_rank("query_start_loc", query_start_loc, 1, "[num_seqs + 1]")
    _require_rank("seq_lens", seq_lens, 1, "[num_seqs]")
    _require_rank("block_table", block_table, 2, "[num_seqs, max_blocks_per_seq]")
    S = seq_lens.shape[0]
    if query_start_loc.shape[0] != S + 1:
        raise ShapeError(
            f"query_start_loc has shape {_shape(query_start_loc)} and seq_lens {_shape(seq_lens)}; "
            f"expected query_start_loc of shape [{S + 1}] (num_seqs + 1)"
        )
    if block_table.shape[0] < S:
        raise ShapeError(
            f"block_table has shape {_shape(block_table)}; expected at least {S} rows (one per sequence in seq_lens)"
        )
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens), ("block_table", block_table)):
        if t.dtype != torch.int32:
            raise DTypeError(f"{name} has dtype {t.dtype}; expected torch.int32")
        if t.device != dev:
            raise DeviceError(f"{name} is on {t.device}; expected the device of query ({dev})")
    if block_table.stride(-1) != 1 and block_table.shape[-1] > 1:
        raise ShapeError(f"block_table has stride {block_table.stride(-1)} in its last dim; expected 1")
    if output is not None:
        output = _require_tensor("output", output)
        if output.dim() != 3 or output.shape[0] < T or output.shape[1] != H or output.shape[2] != Dv:
            raise ShapeError(
                f"output has shape {_shape(output)}; expected [{T}, {H}, {Dv}] ([num_tokens, num_heads, head_size_v])"
            )
        if output.dtype != query.dtype:
            raise DTypeError(f"output has dtype {output.dtype}; expected the dtype of query ({query.dtype})")
        if output.device != dev:
            raise DeviceError(f"output is on {output.device}; expected the device of query ({dev})")
        if output.stride(-1) != 1:
            raise ShapeError(f"output has stride {output.stride(-1)} in its last dim; expected 1")
    if alibi_slopes is not None:
        check_per_head_vector("alibi_slopes", alibi_slopes, H, dev)
    if sinks is not None:
        check_per_head_vector("sinks", sinks, H, dev)
    return Dqk, Dv


def check_cache_write_inputs(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    head_size: int | None = None,
    head_size_v: int | None = None,
    num_kv_heads: int | None = None,
) -> None:
    """Shape/dtype/device checks of a cache write. No value is read."""
    key = _require_tensor("key", key)
    value = _require_tensor("value", value)
    kv_cache = _require_tensor("kv_cache", kv_cache)
    slot_mapping = _require_tensor("slot_mapping", slot_mapping)
    _require_rank("key", key, 3, "[num_tokens, num_kv_heads, head_size]")
    _require_rank("value", value, 3, "[num_tokens, num_kv_heads, head_size_v]")
    _require_rank("kv_cache", kv_cache, 4, "[num_blocks, block_size, num_kv_heads, head_size + head_size_v]")
    _require_rank("slot_mapping", slot_mapping, 1, "[num_tokens]")
    T, Hkv, Dqk = key.shape
    if head_size is not None and Dqk != head_size:
        raise ShapeError(f"key has shape {_shape(key)}; expected head_size={head_size} in dim 2")
    if num_kv_heads is not None and Hkv != num_kv_heads:
        raise ShapeError(f"key has shape {_shape(key)}; expected num_kv_heads={num_kv_heads} in dim 1")
    if value.shape[0] != T or value.shape[1] != Hkv:
        raise ShapeError(f"value has shape {_shape(value)} but key has {_shape(key)}; expected [{T}, {Hkv}, Dv]")
    Dv = value.shape[2]
    if head_size_v is not None and Dv != head_size_v:
        raise ShapeError(f"value has shape {_shape(value)}; expected head_size_v={head_size_v} in dim 2")
    if kv_cache.shape[2] != Hkv or kv_cache.shape[3] != Dqk + Dv:
        raise ShapeError(
            f"kv_cache has shape {_shape(kv_cache)}; expected [num_blocks, block_size, {Hkv}, {Dqk + Dv}] "
            f"(num_kv_heads={Hkv}, head_size {Dqk} + head_size_v {Dv})"
        )
    if kv_cache.stride(-1) != 1:
        raise ShapeError(f"kv_cache has stride {kv_cache.stride(-1)} in its last dim; expected 1")
    if slot_mapping.shape[0] < T:
        raise ShapeError(f"slot_mapping has shape {_shape(slot_mapping)}; expected at least [{T}] (one slot per token)")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"slot_mapping has dtype {slot_mapping.dtype}; expected torch.int64 or torch.int32")
    if value.dtype != key.dtype:
        raise DTypeError(f"value has dtype {value.dtype} but key has {key.dtype}; expected the same dtype")
    if kv_cache.dtype != key.dtype:
        raise DTypeError(
            f"kv_cache has dtype {kv_cache.dtype} but key has {key.dtype}; expected the same dtype "
            "(quantized caches are configured with kv_cache_dtype)"
        )
    for name, t in (("value", value), ("kv_cache", kv_cache), ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            raise DeviceError(f"{name} is on {t.device}; expected the device of key ({key.device})")


def check_query_start_loc_values(
    query_start_loc: torch.Tensor,
    *,
    num_tokens: int,
    name: str = "query_start_loc",
    item: str = "sequence",
    bound: str | None = None,
) -> torch.Tensor:
    """Values of ``query_start_loc`` (a host copy, or copied to the host):
    starts at 0, never decreases, ends at most at ``num_tokens``.

    ``name``/``item``/``bound`` only word the messages (the vLLM adapter
    speaks of ``query_start_loc_cpu``, requests and ``num_actual_tokens``).
    Returns the query lengths (int64, on the CPU).
    """
    qsl = query_start_loc.detach().to("cpu", torch.int64)
    bound = bound or f"the number of query rows ({num_tokens}); expected {name}[-1] <= query.shape[0]"
    if qsl.numel() == 0:
        raise MetadataError(f"{name} is empty; expected [num_seqs + 1] values starting at 0")
    if int(qsl[0]) != 0:
        raise MetadataError(f"{name}[0]={int(qsl[0])}; expected 0")
    q_lens = qsl[1:] - qsl[:-1]
    if (q_lens < 0).any():
        s = int(torch.nonzero(q_lens < 0)[0, 0])
        raise MetadataError(
            f"{name} decreases at {item} {s}: {name}[{s}]={int(qsl[s])} > "
            f"{name}[{s + 1}]={int(qsl[s + 1])}; expected a non-decreasing cumulative sum"
        )
    if int(qsl[-1]) > num_tokens:
        raise MetadataError(f"{name}[-1]={int(qsl[-1])} exceeds {bound}")
    return q_lens


def check_metadata_values(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor | None,
    *,
    num_tokens: int,
    block_size: int,
    num_blocks: int | None = None,
) -> tuple[int, int]:
    """Value checks of attention metadata, on host copies (copies to CPU if needed).

    Returns ``(max_query_len, max_seq_len)``.
    """
    q_lens = check_query_start_loc_values(query_start_loc, num_tokens=num_tokens)
    sl = seq_lens.detach().to("cpu", torch.int64)
    if (sl < 0).any():
        s = int(torch.nonzero(sl < 0)[0, 0])
        raise MetadataError(f"seq_lens[{s}]={int(sl[s])}; expected >= 0")
    short = sl < q_lens
    if short.any():
        s = int(torch.nonzero(short)[0, 0])
        raise MetadataError(
            f"seq_lens[{s}]={int(sl[s])} is smaller than its query length {int(q_lens[s])} "
            f"(query_start_loc[{s}:{s + 2}]); expected seq_len >= q_len (seq_len counts the new tokens too)"
        )
    if block_table is not None:
        bt = block_table.detach().to("cpu", torch.int64)
        need = (sl + block_size - 1) // block_size
        too_short = need > bt.shape[1]
        if too_short.any():
            s = int(torch.nonzero(too_short)[0, 0])
            raise MetadataError(
                f"block_table has {bt.shape[1]} columns but seq_lens[{s}]={int(sl[s])} needs {int(need[s])} "
                f"blocks of block_size={block_size}; expected block_table.shape[1] >= ceil(seq_len / block_size)"
            )
        if num_blocks is not None and bt.shape[1] > 0:
            cols = torch.arange(bt.shape[1])
            used = cols[None, :] < need[:, None]
            bad = used & ((bt[: sl.shape[0]] < 0) | (bt[: sl.shape[0]] >= num_blocks))
            if bad.any():
                s, c = (int(x) for x in torch.nonzero(bad)[0])
                raise MetadataError(
                    f"block_table[{s}, {c}]={int(bt[s, c])} is out of range; expected a block id in "
                    f"[0, {num_blocks}) (kv_cache.shape[0])"
                )
    max_q = int(q_lens.max()) if q_lens.numel() else 0
    max_s = int(sl.max()) if sl.numel() else 0
    return max_q, max_s


def check_slot_mapping_values(slot_mapping: torch.Tensor, *, num_tokens: int, num_slots: int) -> None:
    """Slots must be negative (skip) or in ``[0, num_blocks * block_size)``."""
    sm = slot_mapping[:num_tokens].detach().to("cpu", torch.int64)
    bad = sm >= num_slots
    if bad.any():
        t = int(torch.nonzero(bad)[0, 0])
        raise MetadataError(
            f"slot_mapping[{t}]={int(sm[t])} is out of range; expected a negative value (skip) or a slot in "
            f"[0, {num_slots}) (num_blocks * block_size)"
        )
