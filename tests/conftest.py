"""Test configuration.

On a machine without a CUDA GPU, Triton kernels can only run in the Triton
interpreter, which must be selected before triton is imported: this test
harness sets TRITON_INTERPRET=1 in that case (the library itself never
touches the environment). Tests marked ``gpu`` are skipped without CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffkv.testing.profiles import register_profiles  # noqa: E402

register_profiles()

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
