"""How much of the answer the precision of the scores can support.

Two roundings limit any solver, with ``kappa = cond(M) = (lambda_max(K / N) + lam) / lam``:

* products with ``J`` (``J J^T``, ``J (J^T x)``) are rounded in the working dtype (float32
  or float64, ``eps_w``), an unstructured perturbation of ``M`` of size ``eps_w |K / N|``:
  relative error up to ``kappa eps_w`` (Higham, *Accuracy and Stability of Numerical
  Algorithms*, 2002, ch. 7). When ``kappa eps_w >= 1`` the computed ``M`` need not even be
  positive definite, and natgrad refuses;
* the scores themselves carry the rounding of the policy's dtype (``eps_s``, e.g. float16):
  a perturbation of ``J``, to which the damped least-squares solution is sensitive through
  ``|J| / sqrt(lam N) ~ sqrt(kappa)``, giving about ``sqrt(kappa) eps_s``.

``precision = kappa eps_w + sqrt(kappa) eps_s`` is reported. ``trace(K / N)`` bounds
``lambda_max`` from above for free; a few power iterations refine it only when that cheap
bound exceeds the requested tolerance, or replace it for an operator whose rows cost far
more than its products (:meth:`~natgrad.operators.ScoreOperator.kernel_trace` is
``None``: the matrix-free expected Fisher).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from natgrad.operators import ScoreOperator
from natgrad.solvers._products import apply_kernel

POWER_ITERATIONS = 8
# Seed of the power iteration's start vector: fixed so that the estimate is reproducible and
# does not consume the user's generator (block sampling stays as it was).
_POWER_SEED = 20260526


@dataclass(frozen=True)
class Conditioning:
    """Estimated conditioning of ``M = K / N + lam I`` in the scores' precision.

    Attributes
    ----------
    condition
        Estimate of ``cond(M) = (lambda_max(K / N) + lam) / lam`` (an upper bound from
        ``trace(K / N)`` when that already shows the system is well conditioned).
    precision
        ``condition * eps_w + sqrt(condition) * eps_s``: the relative error that rounding
        alone can cause in ``A~`` and ``d`` (a first-order worst case).
    largest_eigenvalue
        The estimate of ``lambda_max(K / N)`` used.
    product_error
        ``condition * eps_w``, the part due to rounded products; ``>= 1`` is refused.
    kernel_vanishes
        ``trace(K)`` is exactly 0: every score is zero, so ``M = lam I`` and the solution is
        ``rhs / lam`` (:func:`~natgrad.solvers.solve` then runs no iterative solver).
    """

    condition: float
    precision: float
    largest_eigenvalue: float
    product_error: float
    kernel_vanishes: bool = False

    def minimum_damping(self, eps_work: float, eps_score: float, target: float) -> float:
        """About the smallest damping for which ``precision <= target``.

        ``inf`` when no damping can reach ``target`` in these dtypes (``target`` at or
        below about twice the machine epsilon).
        """
        most = min(target / (2 * eps_work), (target / (2 * eps_score)) ** 2)
        if most <= 1.0:
            return math.inf
        return self.largest_eigenvalue / (most - 1.0)


def _conditioning(largest: float, damping: float, eps_work: float, eps_score: float):
    condition = (largest + damping) / damping
    product = condition * eps_work
    return Conditioning(condition, product + condition**0.5 * eps_score, largest, product)


def estimate_conditioning(
    operator: ScoreOperator, damping: float, tol: float, compiled: bool = False
) -> Conditioning:
    """Estimate ``cond(M)`` and the precision the scores' dtype allows.

    Parameters
    ----------
    operator
        The score operator ``J``.
    damping
        ``lam > 0``.
    tol
        The accuracy asked for: power iterations run only when ``trace(K / N)`` cannot
        show that ``cond(M) * eps <= tol``.
    compiled
        Use the fused kernel product for the power iterations.
    """
    eps_work, eps_score = torch.finfo(operator.dtype).eps, torch.finfo(operator.score_dtype).eps
    n = operator.num_samples
    total = operator.kernel_trace()
    trace = math.inf if total is None else total / n  # unknown: power iterations only
    if total is not None and not math.isfinite(trace):
        return Conditioning(math.inf, math.inf, math.inf, math.inf)
    if total == 0.0:  # every score is zero: M = lam I exactly, no power iteration needed
        return replace(_conditioning(0.0, damping, eps_work, eps_score), kernel_vanishes=True)
    largest = trace
    refine = _conditioning(trace, damping, eps_work, eps_score).precision > tol and n > 1
    if refine or total is None:
        generator = torch.Generator().manual_seed(_POWER_SEED)
        x = torch.randn(n, generator=generator, dtype=torch.float64).to(operator.device)
        estimate = 0.0
        for _ in range(POWER_ITERATIONS):
            x = x / torch.linalg.vector_norm(x)
            _, kx = apply_kernel(operator, x, compiled)
            estimate = float(x @ kx)
            if not math.isfinite(estimate) or float(torch.linalg.vector_norm(kx)) == 0.0:
                break
            x = kx
        if math.isfinite(estimate):
            largest = min(max(estimate, 0.0), trace)
        elif total is None:  # the products overflow: nothing to solve with
            return Conditioning(math.inf, math.inf, math.inf, math.inf)
    return _conditioning(largest, damping, eps_work, eps_score)
