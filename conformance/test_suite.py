"""The conformance suite as pytest tests: one test per check of the report.

    pytest conformance --backend package.module:BackendClass [--device cpu|cuda] [--profile quick|thorough]
    pytest --pyargs conformance --diffkv-backend package.module:BackendClass      # installed package

A check that is correctly rejected (declared unsupported) passes; not
declared / skipped checks are reported as skipped.
"""

from __future__ import annotations

import pytest

from conformance.core import Status
from conformance.report import format_failure
from conformance.session import get_session


def pytest_generate_tests(metafunc):
    if "conformance_check" not in metafunc.fixturenames:
        return
    session = get_session(metafunc.config)
    if session.error:
        metafunc.parametrize("conformance_check", [pytest.param(None, marks=pytest.mark.skip(reason=session.error))],
                             ids=["no-backend-given"])
        return
    metafunc.parametrize("conformance_check", session.checks, ids=[c.check_id for c in session.checks])


def test_check(conformance_check, request):
    session = get_session(request.config)
    res = session.run(conformance_check)
    if res.status is Status.FAIL:
        pytest.fail(format_failure(res), pytrace=False)
    if res.status in (Status.NOT_DECLARED, Status.SKIPPED):
        pytest.skip(f"{res.status.label}: {res.message}")
