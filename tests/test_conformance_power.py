"""The conformance suite's power: every deliberately wrong backend of
tests/planted_bugs.py is caught by the quick profile, by the check of the
feature it breaks, with a message that names that feature and a reproducer
that fails again when run; the unbroken hooked backend passes everything."""

from __future__ import annotations

import pytest

from conformance import Status, run_suite
from tests.planted_bugs import PLANTED, HookedBackend


def test_the_hooked_reference_without_a_bug_passes_the_whole_quick_profile():
    report = run_suite(HookedBackend, device="cpu", profile="quick")
    assert report.ok, "\n\n".join(r.message for r in report.failed)


def test_at_least_twelve_distinct_planted_bugs():
    assert len({p.backend for p in PLANTED}) == len(PLANTED) >= 12
    assert all(p.backend.__doc__ for p in PLANTED)


@pytest.mark.parametrize("planted", PLANTED, ids=[p.backend.__name__ for p in PLANTED])
def test_planted_bug_is_caught(planted):
    report = run_suite(planted.backend, device="cpu", profile="quick", checks=list(planted.checks))
    assert [r.check_id for r in report.results] == list(planted.checks)
    for res in report.results:
        assert res.status is Status.FAIL, f"{planted.backend.__name__} not caught by {res.check_id}: {res.message}"
        for word in planted.words:
            assert word in res.message, f"message of {res.check_id} does not name {word!r}: {res.message}"
        if res.reproducer:
            with pytest.raises(AssertionError):
                exec(res.reproducer, {})
