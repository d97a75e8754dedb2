"""Core types of the conformance suite: results, checks, profiles and the
run context (which backend, which device, what it declares).

A *check* is one row of the report: it tests one feature (or one error
contract) of the backend under test and returns a :class:`CheckResult`.
Which checks exist for a backend follows from what the backend *declares*
(:class:`diffkv.BackendCapabilities`): a declared feature is checked
against the float64 reference, an undeclared one must be rejected with
:class:`diffkv.UnsupportedConfigError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

STANDARD_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""dtypes the suite knows how to check, most precise first (float64 last:
it is an oracle dtype, not one SPEC section 1 asks for)."""

OPTIONAL_FEATURES: tuple[str, ...] = ("sliding_window", "softcap", "alibi", "alibi_sqrt", "sinks")
"""Per-layer features of SPEC section 2 (names of :class:`diffkv.Feature`)."""


class Status(str, enum.Enum):
    """Outcome of one check."""

    PASS = "pass"
    FAIL = "fail"
    REJECTED = "unsupported"  # declared unsupported and correctly rejected
    NOT_DECLARED = "not declared"
    SKIPPED = "skipped"

    @property
    def label(self) -> str:
        return {
            Status.PASS: "pass",
            Status.FAIL: "FAIL",
            Status.REJECTED: "unsupported, correctly rejected",
            Status.NOT_DECLARED: "not declared",
            Status.SKIPPED: "skipped",
        }[self]


class CaseFailure(AssertionError):
    """One case of a check failed; the message says what and names the feature."""


@dataclass
class CheckResult:
    """The result of one check (one row of the report).

    Attributes:
        check_id: stable id, e.g. ``"feature/sliding_window"``.
        section: report section (capabilities, semantics, batches, ...).
        feature: the feature the row is about, in words a person searches for.
        status: :class:`Status`.
        message: why it failed / what was checked.
        reproducer: Python code that re-runs the smallest failing case.
        cases: how many cases (examples) ran.
        seconds: wall time of the check.
    """

    check_id: str
    section: str
    feature: str
    status: Status
    message: str = ""
    reproducer: str | None = None
    cases: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.check_id,
            "section": self.section,
            "feature": self.feature,
            "status": self.status.value,
            "message": self.message,
            "reproducer": self.reproducer,
            "cases": self.cases,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Profile:
    """How hard the suite looks. ``quick`` is meant for CI (minutes on two
    CPU cores with the reference backend); ``thorough`` draws many more and
    larger examples.

    Attributes:
        max_examples: hypothesis examples per property check (targeted cases
            come on top).
        derandomize: fixed hypothesis seed (reproducible runs).
        max_seqs / max_q_len / max_context_len / max_kv_heads: size bounds of
            drawn batches.
        max_head_size: largest Dqk / Dv drawn in the general checks (the
            head-size rows also test the headline 192 / 128 pair).
        long_context: (min, max) seq_len of the long-context check (> 1024).
        long_examples: hypothesis examples of the long-context check.
        shrink_seconds: time budget to shrink one failure to a small example.
    """

    name: str
    max_examples: int
    derandomize: bool
    max_seqs: int
    max_q_len: int
    max_context_len: int
    max_kv_heads: int
    max_head_size: int
    long_context: tuple[int, int]
    long_examples: int
    shrink_seconds: float

    def examples(self, weight: float = 1.0) -> int:
        return max(1, round(self.max_examples * weight))


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick", max_examples=20, derandomize=True, max_seqs=4, max_q_len=16, max_context_len=64,
        max_kv_heads=2, max_head_size=64, long_context=(1025, 1300), long_examples=3, shrink_seconds=20.0,
    ),
    "thorough": Profile(
        name="thorough", max_examples=120, derandomize=False, max_seqs=6, max_q_len=48, max_context_len=300,
        max_kv_heads=4, max_head_size=256, long_context=(1025, 4200), long_examples=25, shrink_seconds=120.0,
    ),
}


def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"profile={name!r}; expected one of {sorted(PROFILES)}") from None


@dataclass
class Plan:
    """What will be tested, derived once from the backend's declared capabilities.

    Attributes:
        dtypes: declared dtypes the suite checks (declared, known, not filtered out).
        precise_dtype: the most precise of them; targeted cases use it so a
            one-key mistake stands out of the tolerance.
        draw_pairs: (Dqk, Dv) pairs drawn in the general checks.
        head_pairs: (Dqk, Dv) pairs with a row of their own.
        block_sizes: declared block sizes with a row of their own.
        draw_block_sizes: block sizes drawn in the general checks.
        gqa_ratios: H / Hkv ratios drawn (1 only without GQA).
        features: declared optional features.
    """

    dtypes: tuple[torch.dtype, ...]
    precise_dtype: torch.dtype | None
    draw_pairs: tuple[tuple[int, int], ...]
    head_pairs: tuple[tuple[int, int], ...]
    block_sizes: tuple[int, ...]
    draw_block_sizes: tuple[int, ...]
    gqa_ratios: tuple[int, ...]
    features: frozenset[str]
    excluded_dtypes: tuple[torch.dtype, ...] = ()

    @property
    def runnable(self) -> bool:
        return bool(self.dtypes and self.draw_pairs and self.draw_block_sizes)


@dataclass
class Context:
    """Everything a check needs: the backend class, how to name it in a
    reproducer, the device, the profile and the plan."""

    backend: type
    backend_ref: str
    device: torch.device
    profile: Profile
    plan: Plan
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def caps(self):
        return self.backend.capabilities

    @property
    def name(self) -> str:
        try:
            return str(self.backend.get_name())
        except Exception:  # noqa: BLE001 - a broken get_name is reported by the capabilities check
            return getattr(self.backend, "__name__", "backend")


@dataclass
class Check:
    """One row of the report.

    Attributes:
        check_id: stable id (also the pytest id and the ``reproduce`` key).
        section: report section.
        feature: the feature in words.
        run: ``run(ctx) -> CheckResult``.
        rerun: ``rerun(ctx, *case)`` re-runs one case (raises
            :class:`CaseFailure`); used by :func:`conformance.reproduce`.
        description: one sentence on what is checked.
    """

    check_id: str
    section: str
    feature: str
    run: Callable[[Context], CheckResult]
    rerun: Callable[..., None] | None = None
    description: str = ""
