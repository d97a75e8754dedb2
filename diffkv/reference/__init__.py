"""The readable PyTorch reference backend (the oracle of every test)."""

from diffkv.reference.attention import paged_attention
from diffkv.reference.backend import ReferenceBackend, ReferenceImpl
from diffkv.reference.cache import write_kv_cache

__all__ = ["ReferenceBackend", "ReferenceImpl", "paged_attention", "write_kv_cache"]
