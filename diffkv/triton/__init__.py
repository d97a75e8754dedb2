"""The Triton backend of diffkv (the fast path).

* :mod:`diffkv.triton.backend` -- ``TritonBackend`` ("TRITON_DIFFKV"),
  ``TritonImpl``, ``TritonMetadataBuilder`` behind the shared interface.
* :mod:`diffkv.triton.kernels.cache_writer` -- the cache-writer kernel.
* :mod:`diffkv.triton.kernels.attention` -- attention + split-KV reduce
  kernels and their launcher.
* :mod:`diffkv.triton.launch` -- launch heuristics and the tuned-config table.

Importing this package does not import triton; the submodules do.
"""

__all__ = ["TritonBackend", "TritonImpl", "TritonMetadataBuilder"]


def __getattr__(name: str):
    if name in __all__:
        from diffkv.triton import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'diffkv.triton' has no attribute {name!r}")
