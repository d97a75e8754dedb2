"""Hypothesis profiles. Call :func:`register_profiles` from a conftest (no
side effect at import).

* ``ci`` (default): derandomized (fixed seed), bounded examples, no deadline.
* ``thorough``: many more examples, random seeds -- run on demand with
  ``DIFFKV_HYPOTHESIS_PROFILE=thorough`` or ``--hypothesis-profile=thorough``.
* ``dev``: a handful of examples for quick iteration.

Tests that bound their examples (slow kernels) write
``@settings(max_examples=examples(20))``: 20 under ``ci``, 10x that under
``thorough``, a fifth under ``dev`` -- so the longer profile really draws more.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


PROFILE_ENV = "DIFFKV_HYPOTHESIS_PROFILE"
EXAMPLE_FACTORS = {"ci": 1.0, "thorough": 10.0, "dev": 0.2}


def examples(n: int) -> int:
    """``n`` examples scaled by the active profile (see module docstring)."""
    factor = EXAMPLE_FACTORS.get(os.environ.get(PROFILE_ENV, "ci"), 1.0)
    return max(1, int(n * factor))


def register_profiles() -> str:
    settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
                              suppress_health_check=_SUPPRESS, database=None)
    settings.register_profile("thorough", max_examples=400, deadline=None, print_blob=True,
                              suppress_health_check=_SUPPRESS)
    settings.register_profile("dev", max_examples=5, deadline=None, derandomize=True, suppress_health_check=_SUPPRESS,
                              database=None)
    name = os.environ.get(PROFILE_ENV, "ci")
    settings.load_profile(name)
    return name
