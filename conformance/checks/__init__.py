"""The library of named checks. :func:`all_checks` lists, for one backend
(its declared capabilities) on one device, every row of the report in a
stable order."""

from __future__ import annotations

from conformance.checks.behaviour import behaviour_checks
from conformance.checks.cache import cache_checks
from conformance.checks.capabilities import capabilities_checks
from conformance.checks.errors import malformed_checks, unsupported_checks
from conformance.checks.semantics import semantic_checks
from conformance.core import Check, Context

_ORDER = ("capabilities", "semantics/", "dtype/", "block_size/", "head_size/", "gqa", "feature/", "batch/",
          "block_boundaries", "long_context", "output_padding", "profiling_run", "determinism", "functional_api",
          "strided_kv_cache", "engine_step", "cuda_graph", "cache_writer", "kv_cache_dtype/", "unsupported/",
          "malformed/")


def _rank(check: Check) -> int:
    for i, prefix in enumerate(_ORDER):
        if check.check_id == prefix or (prefix.endswith("/") and check.check_id.startswith(prefix)) or \
                check.check_id.startswith(prefix + "/"):
            return i
    return len(_ORDER)


def all_checks(ctx: Context) -> list[Check]:
    checks: list[Check] = []
    for make in (capabilities_checks, semantic_checks, unsupported_checks, behaviour_checks, cache_checks,
                 malformed_checks):
        checks.extend(make(ctx))
    indexed = sorted(enumerate(checks), key=lambda ic: (_rank(ic[1]), ic[0]))
    out = [c for _, c in indexed]
    ids = [c.check_id for c in out]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise RuntimeError(f"duplicate check ids {sorted(dup)} (a bug in the conformance suite)")
    return out


__all__ = ["all_checks"]
