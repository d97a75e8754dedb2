"""diffkv: paged attention with different query/key and value head sizes.

Public API::

    diffkv.paged_attention(...)     # functional attention
    diffkv.write_kv_cache(...)      # functional cache writer
    diffkv.load_backend("triton")   # backend classes (vLLM-style contract)

Importing diffkv imports neither Triton kernels nor vLLM and changes no
process-wide state.
"""

from diffkv.backends import load_backend
from diffkv.errors import (
    DeviceError,
    DTypeError,
    InvalidInputError,
    MetadataError,
    ShapeError,
    UnsupportedConfigError,
)
from diffkv.functional import paged_attention, write_kv_cache
from diffkv.interface import BackendCapabilities, DiffKVBackend, DiffKVImpl, Feature
from diffkv.metadata import CommonAttentionMetadata, DiffKVMetadata, DiffKVMetadataBuilder, KVCacheSpec

__version__ = "0.1.0"

__all__ = [
    "BackendCapabilities",
    "CommonAttentionMetadata",
    "DTypeError",
    "DeviceError",
    "DiffKVBackend",
    "DiffKVImpl",
    "DiffKVMetadata",
    "DiffKVMetadataBuilder",
    "Feature",
    "InvalidInputError",
    "KVCacheSpec",
    "MetadataError",
    "ShapeError",
    "UnsupportedConfigError",
    "load_backend",
    "paged_attention",
    "write_kv_cache",
]
