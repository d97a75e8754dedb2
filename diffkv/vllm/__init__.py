"""vLLM drop-in adapter: diffkv's kernels behind vLLM's own attention-backend
base classes (pinned release: vllm==0.33.0).

Install with ``pip install 'diffkv[vllm]'``. vLLM then loads the plugin entry
point ``diffkv = "diffkv.vllm:register"`` of the ``vllm.general_plugins``
group in every vLLM process, which registers the backend under
:data:`BACKEND_NAME` (``"DIFFKV_TRITON_DIFFKV"``) in
``vllm.v1.attention.backends.registry.AttentionBackendEnum``. Select it with
``--attention-backend DIFFKV_TRITON_DIFFKV`` (or
``attention_config={"backend": "DIFFKV_TRITON_DIFFKV"}``): vLLM's DiffKV model
code (e.g. MiMo-V2) accepts any backend whose name ends in ``_DIFFKV``.

Outside vLLM's plugin loading, call :func:`register` yourself.

Importing this package does not import vllm (``register`` and the classes
do, lazily), so the entry point costs nothing until vLLM calls it.

The classes live in :mod:`diffkv.vllm.backend`:

* ``DiffKVVllmBackend`` -- subclass of ``vllm.v1.attention.backend.AttentionBackend``;
* ``DiffKVVllmImpl`` -- subclass of ``AttentionImpl``; holds one diffkv impl per
  (Dv, device type) and hands it the cache as a ``transpose(1, 2)`` *view*;
* ``DiffKVVllmMetadataBuilder`` -- subclass of ``AttentionMetadataBuilder``;
  wraps the diffkv builder (Triton: preallocated split-KV workspace sized by
  the group's ``head_size_v``).
"""

from __future__ import annotations

import logging

BACKEND_NAME = "DIFFKV_TRITON_DIFFKV"
"""Name in vLLM's backend registry. Ends in ``_DIFFKV``: vLLM's model code
only picks DiffKV backends by that suffix."""

BACKEND_CLASS_PATH = "diffkv.vllm.backend.DiffKVVllmBackend"
"""Qualified name vLLM resolves (``resolve_obj_by_qualname``) on first use."""

VLLM_VERSION = "0.33.0"
"""The vLLM release this adapter subclasses (``pip install 'diffkv[vllm]'`` pins it)."""

PLUGIN_GROUP = "vllm.general_plugins"
"""Entry-point group vLLM 0.33 loads in every process (``vllm.plugins.load_general_plugins``)."""

__all__ = [
    "BACKEND_CLASS_PATH",
    "BACKEND_NAME",
    "DiffKVVllmBackend",
    "DiffKVVllmImpl",
    "DiffKVVllmMetadataBuilder",
    "PLUGIN_GROUP",
    "VLLM_VERSION",
    "register",
]

_logger = logging.getLogger(__name__)


def installed_vllm_version() -> str | None:
    """Version of the installed vllm distribution (read from its metadata,
    without importing vllm); None when vllm is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def register() -> None:
    """Register :data:`BACKEND_NAME` -> :data:`BACKEND_CLASS_PATH` in vLLM's
    attention-backend registry. Idempotent (vLLM may load plugins more than
    once, and users may call it too). Logs a warning when the installed vLLM
    is not :data:`VLLM_VERSION` (the adapter subclasses that release's base
    classes) but registers anyway: a plugin must not abort vLLM's start.

    Raises:
        ModuleNotFoundError: vllm is not installed.
    """
    found = installed_vllm_version()
    if found is not None and found != VLLM_VERSION:
        _logger.warning(
            "diffkv.vllm: the adapter is built against vllm==%s but vllm==%s is installed; "
            "install the pinned release with `pip install 'diffkv[vllm]'`",
            VLLM_VERSION,
            found,
        )
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    member = AttentionBackendEnum.__members__.get(BACKEND_NAME)
    if member is None:
        register_backend(BACKEND_NAME, BACKEND_CLASS_PATH)
    elif member.get_path() != BACKEND_CLASS_PATH:
        register_backend(member, BACKEND_CLASS_PATH)


def __getattr__(name: str):
    if name in ("DiffKVVllmBackend", "DiffKVVllmImpl", "DiffKVVllmMetadataBuilder"):
        from diffkv.vllm import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'diffkv.vllm' has no attribute {name!r}")
