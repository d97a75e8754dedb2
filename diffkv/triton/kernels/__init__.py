"""Triton kernels of diffkv: the cache writer and the attention (+ split-KV
reduce) kernels with their host launchers. Importing this package imports
triton (set TRITON_INTERPRET=1 before that to run them on a CPU)."""
