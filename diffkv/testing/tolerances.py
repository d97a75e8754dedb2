"""Per-dtype tolerances -- the one place they are written and justified.

A backend's output ``out`` is compared with the reference computed in
float64 from the *same* (already rounded) inputs, elementwise:

    |out - ref| <= atol + rtol * |ref|

Inputs are N(0, 1), so outputs (convex combinations of V rows) are O(1).

* float32: the kernel must accumulate in fp32 with full-precision products
  (no TF32). Error grows with the number of keys summed (~sqrt(n) * 2^-24
  per term, plus exp/rescaling): 1e-4 leaves a wide margin at 64k keys
  while still catching any wrong key, weight or mask (errors of order 1e-2
  and up).
* float16: the output is rounded to fp16 (half-ulp 2^-11 ~ 4.9e-4 relative)
  and P is rounded to fp16 before the P.V product (relative 4.9e-4 per
  weight); 4e-3 absolute + relative covers both with margin at O(1) values.
* bfloat16: 8 mantissa bits, half-ulp 2^-8 ~ 3.9e-3 relative, and the same
  two roundings: 3e-2.

A wrong mask (one key too many or too few out of n) moves an output by
roughly |V| / n; the suite keeps n <= 128 keys in at least one sequence of
each example where it hunts for off-by-one masks, so such bugs exceed the
fp16 tolerance.

Large logits. The table assumes logits of moderate size (scale ~ Dqk**-0.5).
A logit computed with fp32 accumulation carries an absolute rounding error
of about u * scale * sum_d |q_d k_d| (u = 2^-24; measured: <= 2.5 u times
that on 192-long dot products, for torch and Triton alike), and softmax
turns logit errors dx into output errors of at most 2 * max|dx| * max|V|.
With scale = 20 and Dqk = 192 that is ~1e-4 of logit error (logits ~ 1e3):
an exact fp32 kernel cannot meet 1e-4 there. :func:`logit_rounding_atol`
adds exactly this term, with a factor-4 margin: ``2 * 4u * L * max|V|``
where ``L = scale * max_j sum_d |q_d k_jd|`` per query row and head. At the
usual scale it is ~1e-6 (negligible next to the table); it only grows where
the logits themselves are huge. Callers opt in (``compare(extra_atol=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-10),
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4),
    torch.float16: Tolerance(atol=4e-3, rtol=4e-3),
    torch.bfloat16: Tolerance(atol=3e-2, rtol=3e-2),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[dtype]


ACCUMULATION_UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-24,  # fp16 / bf16 inputs accumulate in fp32 (SPEC section 2, step 1)
    torch.bfloat16: 2.0**-24,
}
LOGIT_ROUNDING_MARGIN = 4.0


def logit_rounding_atol(dtype: torch.dtype, logit_magnitude: torch.Tensor, value_max: torch.Tensor | float
                        ) -> torch.Tensor:
    """Extra absolute tolerance for rounding of huge logits (see the module docstring).

    logit_magnitude: ``scale * max_j sum_d |q_d k_jd|`` per query row and head, e.g. ``[T, H, 1]``;
    value_max: ``max |V|`` broadcastable to it. Returns ``2 * margin * u * L * max|V|``.
    """
    u = ACCUMULATION_UNIT_ROUNDOFF[dtype]
    return 2.0 * LOGIT_ROUNDING_MARGIN * u * logit_magnitude * value_max


@dataclass
class Comparison:
    ok: bool
    max_abs_err: float
    worst_index: tuple[int, ...] | None
    message: str


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output",
            extra_atol: torch.Tensor | float | None = None) -> Comparison:
    """Compare ``out`` with ``ref`` (any dtypes; done in float64) under the table
    (plus ``extra_atol``, broadcastable to ``out``: e.g. :func:`logit_rounding_atol`)."""
    tol = tolerance_for(dtype)
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if o.shape != r.shape:
        return Comparison(False, float("inf"), None, f"{what}: shape {list(o.shape)} != expected {list(r.shape)}")
    if o.numel() == 0:
        return Comparison(True, 0.0, None, f"{what}: empty")
    err = (o - r).abs()
    bound = tol.atol + tol.rtol * r.abs()
    if extra_atol is not None:
        bound = bound + (extra_atol.detach().to("cpu", torch.float64) if isinstance(extra_atol, torch.Tensor)
                         else float(extra_atol))
    bad = ~(err <= bound)  # NaN counts as bad
    max_err = float(torch.nan_to_num(err, nan=float("inf")).max())
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        n_bad = int(bad.sum())
        extra = ""
        if extra_atol is not None:
            e = extra_atol if not isinstance(extra_atol, torch.Tensor) else \
                float(torch.broadcast_to(extra_atol.detach().cpu().double(), o.shape)[idx])
            extra = f" (+ logit-rounding allowance {e:.3g} there)"
        msg = (
            f"{what}: {n_bad} of {o.numel()} elements outside atol={tol.atol:g} rtol={tol.rtol:g}{extra} "
            f"({str(dtype).replace('torch.', '')}); first at index {list(idx)}: got {float(o[idx]):.6g}, "
            f"expected {float(r[idx]):.6g}; max abs error {max_err:.3g}"
        )
        return Comparison(False, max_err, idx, msg)
    return Comparison(True, max_err, None, f"{what}: max abs error {max_err:.3g} within tolerance")


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    c = compare(out, ref, dtype, what)
    assert c.ok, c.message
