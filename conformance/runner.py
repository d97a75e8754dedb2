"""Running checks: the plan derived from a backend's capabilities, the
hypothesis driver (with shrinking to the smallest failing example), the
whole suite, and :func:`reproduce` for one case."""

from __future__ import annotations

import fnmatch
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from conformance.core import (
    OPTIONAL_FEATURES,
    STANDARD_DTYPES,
    CaseFailure,
    Check,
    CheckResult,
    Context,
    Plan,
    Profile,
    Status,
    get_profile,
)
from conformance.harness import load_backend, reproducer

PAIR_CANDIDATES: tuple[tuple[int, int], ...] = (
    (64, 32), (32, 64), (32, 32), (48, 32), (64, 64), (96, 64), (64, 128), (128, 64), (128, 128), (192, 128),
    (128, 192), (256, 128), (256, 256),
)
"""(Dqk, Dv) pairs in the order the suite prefers them (cheap first; Dv < Dqk,
Dv > Dqk and Dv = Dqk early)."""

HEADLINE_PAIR = (192, 128)


def make_plan(backend: type, profile: Profile, dtypes: Iterable[torch.dtype] | None = None) -> Plan:
    """What to test, from what ``backend.capabilities`` declares."""
    caps = backend.capabilities
    wanted = None if dtypes is None else tuple(dtypes)
    declared = [d for d in STANDARD_DTYPES if d in tuple(caps.dtypes)]
    tested = tuple(d for d in declared if wanted is None or d in wanted)
    excluded = tuple(d for d in declared if d not in tested)
    hs, hsv = set(caps.head_sizes), set(caps.head_sizes_v)
    supported = [p for p in PAIR_CANDIDATES if p[0] in hs and p[1] in hsv]
    draw = [p for p in supported if max(p) <= profile.max_head_size]
    if not draw and hs and hsv:
        draw = [(min(hs), min(hsv))]
    head_pairs: list[tuple[int, int]] = []
    if profile.name == "thorough":
        head_pairs = list(supported)
    else:
        for pick in (lambda p: p[1] < p[0], lambda p: p[1] > p[0], lambda p: p[1] == p[0]):
            hit = next((p for p in draw if pick(p)), None) or next((p for p in supported if pick(p)), None)
            if hit and hit not in head_pairs:
                head_pairs.append(hit)
        if HEADLINE_PAIR in supported and HEADLINE_PAIR not in head_pairs:
            head_pairs.append(HEADLINE_PAIR)
    if not head_pairs:
        head_pairs = list(draw)
    m, mx = caps.block_size_multiple, caps.max_block_size
    declared_bs = [b for b in range(m, mx + 1, m)] if m > 0 else []
    want_bs = {m, 2 * m, mx} | ({4 * m} if profile.name == "thorough" else set())
    block_sizes = tuple(b for b in declared_bs if b in want_bs)
    draw_bs = tuple(b for b in declared_bs if b in ({m, 2 * m} | ({4 * m} if profile.name == "thorough" else set())))
    features = frozenset(f for f in OPTIONAL_FEATURES if f in caps.features)
    gqa = (1, 2, 4, 8) if "gqa" in caps.features else (1,)
    return Plan(
        dtypes=tested,
        precise_dtype=tested[0] if tested else None,
        draw_pairs=tuple(draw),
        head_pairs=tuple(head_pairs),
        block_sizes=block_sizes,
        draw_block_sizes=draw_bs,
        gqa_ratios=gqa,
        features=features,
        excluded_dtypes=excluded,
    )


def default_device(backend: type) -> str:
    devices = tuple(getattr(backend.capabilities, "devices", ("cpu",)))
    if torch.cuda.is_available() and "cuda" in devices:
        return "cuda"
    return "cpu"


def parse_dtypes(text: str | Iterable | None) -> tuple[torch.dtype, ...] | None:
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if isinstance(item, torch.dtype):
            out.append(item)
            continue
        name = item.strip().replace("torch.", "")
        aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
                   "fp64": "float64", "double": "float64"}
        name = aliases.get(name, name)
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype) or dt not in STANDARD_DTYPES:
            raise ValueError(f"dtype {item!r}; expected some of float16, bfloat16, float32, float64")
        out.append(dt)
    return tuple(out)


def make_context(backend: str | type, device: str | torch.device | None = None, profile: str | Profile = "quick",
                 dtypes: Iterable | str | None = None, seed: int | None = None) -> Context:
    cls, ref = load_backend(backend)
    prof = get_profile(profile)
    dev = torch.device(device if device is not None else default_device(cls))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    plan = make_plan(cls, prof, parse_dtypes(dtypes))
    return Context(backend=cls, backend_ref=ref, device=dev, profile=prof, plan=plan, seed=seed)


# --------------------------------------------------------------------------- hypothesis driver
def hypothesis_settings(ctx: Context, examples: int):
    from hypothesis import HealthCheck, Phase, Verbosity, settings

    return settings(
        max_examples=examples,
        derandomize=ctx.profile.derandomize and ctx.seed is None,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        print_blob=False,
    )


@dataclass
class _Search:
    runs: int = 0
    failing: tuple | None = None
    message: str = ""
    first_failure_at: float | None = None


def search(ctx: Context, strategy, run_case: Callable[..., None], examples: int) -> _Search:
    """Run ``run_case(ctx, *case)`` on ``examples`` cases drawn from
    ``strategy``; on failure, let hypothesis shrink it (within the profile's
    time budget) and return the smallest failing case and its message."""
    from hypothesis import given
    from hypothesis import seed as hseed

    state = _Search()
    budget = ctx.profile.shrink_seconds

    def attempt(case):
        if state.failing is not None and case != state.failing and \
                time.monotonic() - state.first_failure_at > budget:
            return  # shrinking budget spent: report the smallest failure found so far
        state.runs += 1
        try:
            run_case(ctx, *case)
        except CaseFailure as e:
            state.failing, state.message = case, str(e)
            if state.first_failure_at is None:
                state.first_failure_at = time.monotonic()
            raise

    prop = given(strategy)(attempt)
    if ctx.seed is not None:
        prop = hseed(ctx.seed)(prop)
    prop = hypothesis_settings(ctx, examples)(prop)
    try:
        prop()
    except CaseFailure:
        pass
    except Exception as e:  # hypothesis' Flaky & co: a failure that did not reproduce
        if state.failing is None:
            raise
        state.message += f" (note: the failure did not reproduce on replay: {type(e).__name__}; nondeterministic?)"
    return state


def property_check(
    ctx: Context,
    check: Check,
    *,
    strategy,
    run_case: Callable[..., None],
    targeted: Sequence[tuple] = (),
    examples: int | None = None,
    passed: str = "",
) -> CheckResult:
    """Hypothesis cases, then the hand-picked targeted cases. Fails with the
    smallest failing case (shrunk by hypothesis, or the targeted case)."""
    n = ctx.profile.examples() if examples is None else examples
    runs = 0
    if strategy is not None and n > 0:
        found = search(ctx, strategy, run_case, n)
        runs += found.runs
        if found.failing is not None:
            return result(check, Status.FAIL, found.message, cases=runs,
                          reproducer=reproducer(ctx, check.check_id, found.failing))
    for case in targeted:
        runs += 1
        try:
            run_case(ctx, *case)
        except CaseFailure as e:
            return result(check, Status.FAIL, str(e), cases=runs, reproducer=reproducer(ctx, check.check_id, case))
    return result(check, Status.PASS, passed or f"{runs} cases agree", cases=runs)


def targeted_check(ctx: Context, check: Check, cases: Sequence[tuple], run_case: Callable[..., None],
                   passed: str = "", status: Status = Status.PASS) -> CheckResult:
    """Fixed cases only; ``status`` is what a clean run reports (PASS, or
    REJECTED for error-contract checks of undeclared features)."""
    res = property_check(ctx, check, strategy=None, run_case=run_case, targeted=cases, examples=0, passed=passed)
    if res.status is Status.PASS:
        res.status = status
    return res


def static_check(check_id: str, section: str, feature: str, status: Status, message: str) -> Check:
    """A row whose outcome is known without running anything (not declared, skipped)."""
    check = Check(check_id=check_id, section=section, feature=feature, run=lambda ctx: result(check, status, message))
    return check


def result(check: Check, status: Status, message: str = "", *, cases: int = 0,
           reproducer: str | None = None) -> CheckResult:
    return CheckResult(check_id=check.check_id, section=check.section, feature=check.feature, status=status,
                       message=message, reproducer=reproducer, cases=cases)


# --------------------------------------------------------------------------- suite
@dataclass
class SuiteReport:
    backend: str
    backend_name: str
    device: str
    profile: str
    dtypes: list[str]
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for r in self.results:
            out[r.status.value] += 1
        return out


def run_check(check: Check, ctx: Context) -> CheckResult:
    """Run one check; time it; turn a crash of the suite itself into a failure
    that says so."""
    t0 = time.perf_counter()
    try:
        res = check.run(ctx)
    except CaseFailure as e:  # a check that raised instead of returning
        res = result(check, Status.FAIL, str(e))
    except Exception as e:  # noqa: BLE001
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
        res = result(check, Status.FAIL, f"[{check.feature}] the check crashed with {type(e).__name__}: {e}\n{tb}")
    res.seconds = time.perf_counter() - t0
    return res


def select(checks: Sequence[Check], patterns: Iterable[str] | str | None) -> list[Check]:
    """Checks whose id matches any of the glob patterns (all if None)."""
    if patterns is None:
        return list(checks)
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    pats = [p.strip() for p in patterns]
    chosen = [c for c in checks if any(fnmatch.fnmatchcase(c.check_id, p) or c.check_id == p for p in pats)]
    return chosen


def run_suite(
    backend: str | type,
    device: str | torch.device | None = None,
    profile: str | Profile = "quick",
    *,
    checks: Iterable[str] | str | None = None,
    dtypes: Iterable | str | None = None,
    seed: int | None = None,
    progress: Callable[[CheckResult], None] | None = None,
) -> SuiteReport:
    """Run the suite (or the checks matching ``checks``) on ``backend``."""
    from conformance.checks import all_checks

    ctx = make_context(backend, device, profile, dtypes, seed)
    t0 = time.perf_counter()
    report = SuiteReport(backend=ctx.backend_ref, backend_name=ctx.name, device=str(ctx.device),
                         profile=ctx.profile.name, dtypes=[str(d).replace("torch.", "") for d in ctx.plan.dtypes])
    for check in select(all_checks(ctx), checks):
        res = run_check(check, ctx)
        report.results.append(res)
        if progress is not None:
            progress(res)
    report.seconds = time.perf_counter() - t0
    return report


def reproduce(backend: str | type, check_id: str, *case, device: str | None = None,
              profile: str = "quick") -> str:
    """Re-run one case of one check (the call a report prints for a failure).

    Raises ``AssertionError`` with the failure message if the case still
    fails; returns ``"ok"`` otherwise. Without ``case``, re-runs the whole
    check (fixed-case checks such as the error contracts).
    """
    from conformance.checks import all_checks

    ctx = make_context(backend, device, profile)
    for check in all_checks(ctx):
        if check.check_id == check_id:
            break
    else:
        raise ValueError(f"check_id={check_id!r} is not a check of this backend")
    if case and check.rerun is not None:
        check.rerun(ctx, *case)
        return "ok"
    res = run_check(check, ctx)
    if res.failed:
        raise CaseFailure(res.message)
    return "ok"
