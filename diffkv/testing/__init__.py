"""Test helpers shipped with diffkv (used by tests/ and conformance/):
batches with poisoned padding, hypothesis strategies, tolerance table.

Importing this package needs hypothesis only for ``diffkv.testing.strategies``.
"""

from diffkv.testing.batches import Batch, BatchSpec, LayerFeatures, SeqShape, make_batch
from diffkv.testing.tolerances import TOLERANCES, Tolerance, assert_close, compare, tolerance_for

__all__ = [
    "Batch",
    "BatchSpec",
    "LayerFeatures",
    "SeqShape",
    "TOLERANCES",
    "Tolerance",
    "assert_close",
    "compare",
    "make_batch",
    "tolerance_for",
]
