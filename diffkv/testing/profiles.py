"""Hypothesis profiles. Call :func:`register_profiles` from a conftest (no
side effect at import).

* ``ci`` (default): derandomized (fixed seed), bounded examples, no deadline.
* ``thorough``: many more examples, random seeds -- run on demand with
  ``DIFFKV_HYPOTHESIS_PROFILE=thorough`` or ``--hypothesis-profile=thorough``.
* ``dev``: a handful of examples for quick iteration.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def register_profiles() -> str:
    settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
                              suppress_health_check=_SUPPRESS, database=None)
    settings.register_profile("thorough", max_examples=400, deadline=None, print_blob=True,
                              suppress_health_check=_SUPPRESS)
    settings.register_profile("dev", max_examples=5, deadline=None, derandomize=True, suppress_health_check=_SUPPRESS,
                              database=None)
    name = os.environ.get("DIFFKV_HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    return name
