"""diffkv conformance suite: point it at any DiffKV backend class.

Command line::

    diffkv-conformance --backend package.module:BackendClass [--device cpu|cuda]
                       [--profile quick|thorough] [--report out.json]

pytest::

    pytest conformance --backend package.module:BackendClass                  # from the repository
    pytest --pyargs conformance --diffkv-backend package.module:BackendClass  # installed package

Python::

    from conformance import run_suite
    report = run_suite("package.module:BackendClass", device="cpu", profile="quick")
    assert report.ok, [r.message for r in report.failed]

The suite reads what the backend declares (``capabilities``), checks every
declared capability against diffkv's float64 reference and checks that
everything else is refused with ``diffkv.UnsupportedConfigError``. See
``docs/conformance.md``.

Importing this package is cheap (names are resolved lazily): the pytest
plugin ``conformance.plugin`` is loaded by every pytest run where diffkv is
installed and must not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PROFILES": "conformance.core",
    "CaseFailure": "conformance.core",
    "Check": "conformance.core",
    "CheckResult": "conformance.core",
    "Profile": "conformance.core",
    "Status": "conformance.core",
    "SuiteReport": "conformance.runner",
    "make_context": "conformance.runner",
    "reproduce": "conformance.runner",
    "run_suite": "conformance.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
