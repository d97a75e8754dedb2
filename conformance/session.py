"""The pytest side of the suite: one :class:`Session` per pytest run, built
from the ``--diffkv-*`` options, shared by the parametrized tests of
``conformance/test_suite.py`` and the terminal summary."""

from __future__ import annotations

import os

from conformance.core import CheckResult

_KEY = "_diffkv_conformance_session"


class Session:
    def __init__(self, config) -> None:
        from conformance.checks import all_checks
        from conformance.runner import make_context, select

        opt = config.getoption
        self.config = config
        self.backend_spec = opt("diffkv_backend", None)
        self.report_path = opt("diffkv_report", None)
        self.results: list[CheckResult] = []
        self.error: str | None = None
        self.ctx = None
        self.checks = []
        if not self.backend_spec:
            self.error = ("the conformance suite needs a backend: pytest conformance --backend package.module:Class "
                          "(or --diffkv-backend)")
            return
        if os.getcwd() not in __import__("sys").path:
            __import__("sys").path.insert(0, os.getcwd())
        try:
            self.ctx = make_context(self.backend_spec, opt("diffkv_device", None), opt("diffkv_profile", None) or "quick",
                                    opt("diffkv_dtypes", None))
        except (ImportError, ValueError, AttributeError) as e:
            import pytest

            raise pytest.UsageError(f"diffkv conformance: cannot load backend {self.backend_spec!r}: "
                                    f"{type(e).__name__}: {e}") from None
        devices = tuple(getattr(self.ctx.caps, "devices", ()))
        if self.ctx.device.type not in devices:
            import pytest

            raise pytest.UsageError(f"diffkv conformance: backend {self.ctx.backend_ref} does not declare device "
                                    f"{self.ctx.device.type!r} (declares {list(devices)}); pass --diffkv-device")
        self.checks = select(all_checks(self.ctx), opt("diffkv_checks", None))

    def run(self, check) -> CheckResult:
        from conformance.runner import run_check

        res = run_check(check, self.ctx)
        self.results.append(res)
        return res

    def report(self):
        from conformance.runner import SuiteReport

        rep = SuiteReport(backend=self.ctx.backend_ref, backend_name=self.ctx.name, device=str(self.ctx.device),
                          profile=self.ctx.profile.name,
                          dtypes=[str(d).replace("torch.", "") for d in self.ctx.plan.dtypes],
                          results=list(self.results))
        rep.seconds = sum(r.seconds for r in self.results)
        return rep


def get_session(config) -> Session:
    session = getattr(config, _KEY, None)
    if session is None:
        session = Session(config)
        setattr(config, _KEY, session)
    return session


def peek_session(config) -> Session | None:
    return getattr(config, _KEY, None)
