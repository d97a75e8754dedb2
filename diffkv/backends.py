"""Backend registry: names -> backend classes, imported lazily."""

from __future__ import annotations

import importlib

import torch

from diffkv.errors import InvalidInputError
from diffkv.interface import DiffKVBackend

BUILTIN_BACKENDS: dict[str, str] = {
    "reference": "diffkv.reference.backend:ReferenceBackend",
    "triton": "diffkv.triton.backend:TritonBackend",
}


def load_backend(spec: str) -> type[DiffKVBackend]:
    """A backend class from a builtin name (``"reference"``, ``"triton"``) or
    an import path ``"package.module:Class"``."""
    path = BUILTIN_BACKENDS.get(spec, spec)
    if ":" not in path:
        raise InvalidInputError(
            f"backend={spec!r}; expected one of {sorted(BUILTIN_BACKENDS)} , 'auto' or 'package.module:Class'"
        )
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise InvalidInputError(f"backend={spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    return cls


def resolve_backend(backend: str, device: torch.device) -> type[DiffKVBackend]:
    """``"auto"`` picks Triton for CUDA tensors and the reference otherwise."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    return load_backend(backend)
