"""The contract every solver of ``(K / N + lam I) x = rhs`` satisfies."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad.errors import IllConditionedError
from natgrad.scores import ScoreOperator
from natgrad.solvers.fused import fused_kernel, fused_matvec


@dataclass(frozen=True)
class SolveResult:
    """What a solver returns.

    Attributes
    ----------
    x
        The transformed advantages ``A~`` (float64, shape ``(N,)``).
    v
        ``J^T x / N`` (float64, shape ``(P,)``), the natural-gradient direction, or
        ``None`` when the solver never formed it.
    jv
        ``J v`` (float64, shape ``(N,)``) at the returned ``x``: equals ``J d``.
    residual
        Relative residual ``|rhs - M x| / |rhs|`` of the returned ``x``.
    iterations
        Epochs (Kaczmarz), iterations (CG) or 1 (Cholesky).
    converged
        Whether ``residual <= tol`` and ``direction_error <= tol``.
    direction_error
        Bound on the relative error of the direction ``d`` (see :func:`direction_error`);
        ``None`` for the exact Cholesky solve, whose error is rounding only.
    condition, precision
        Estimated ``cond(K / N + lam I)`` and ``condition * eps`` of the scores' dtype (set
        by :func:`~natgrad.solvers.solve`; see :mod:`natgrad.solvers.conditioning`).
    """

    x: Tensor
    v: Tensor | None
    jv: Tensor
    residual: float
    iterations: int
    converged: bool
    direction_error: float | None = None
    condition: float | None = None
    precision: float | None = None

    def scaled(self, factor: float) -> SolveResult:
        """The same solve for ``factor * rhs`` (the system is linear in the right-hand side)."""
        return SolveResult(
            self.x * factor,
            None if self.v is None else self.v * factor,
            self.jv * factor,
            self.residual,
            self.iterations,
            self.converged,
            self.direction_error,
            self.condition,
            self.precision,
        )


def relative_residual(rhs: Tensor, jv: Tensor, x: Tensor, damping: float) -> float:
    """``|rhs - (J v + lam x)| / |rhs|`` where ``J v = K x / N``."""
    norm = torch.linalg.vector_norm(rhs)
    if float(norm) == 0.0:
        return float(torch.linalg.vector_norm(jv + damping * x))
    return float(torch.linalg.vector_norm(rhs - jv - damping * x) / norm)


def not_positive_definite(damping: float, matrix: Tensor, dtype: torch.dtype) -> Exception:
    """Natgrad's error for a Cholesky factorization of ``K / N + lam I`` that failed."""
    eps = torch.finfo(dtype).eps
    largest = float(matrix.diagonal().abs().max()) if matrix.numel() else 0.0
    suggestion = 10 * eps * max(largest - damping, 0.0) * matrix.shape[0] ** 0.5
    return IllConditionedError(
        f"K/N + damping I is not positive definite in floating point: damping={damping:g} "
        f"is below the rounding error of the {str(dtype).removeprefix('torch.')} scores "
        f"(largest diagonal entry of K/N {largest:.3g}); use damping >= {suggestion:.2g}"
        + ("" if dtype == torch.float64 else " or float64 parameters")
    )


def cholesky_factor(matrix: Tensor, damping: float, dtype: torch.dtype) -> Tensor:
    """Cholesky factor of ``matrix = K_SS / N + lam I``, or natgrad's own error."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0 or not bool(torch.isfinite(factor.diagonal()).all()):
        raise not_positive_definite(damping, matrix, dtype)
    return factor


def direction_error(
    residual_norm: float,
    v: Tensor,
    damping: float,
    num_samples: int,
    offset: Tensor | None = None,
) -> float:
    """Bound on ``|d - d*| / |d*|`` from the residual ``r = rhs - M x`` of an iterate.

    The direction is ``d = J^T x / N`` (up to an affine map ``d ~ v - offset``, used by the
    supervised push-through form). Since ``d* - d = J^T M^{-1} r / N`` and the singular
    values of ``J^T (J J^T / N + lam I)^{-1} / N`` are ``s / (s^2 + lam N) <= 1 / (2 sqrt(lam N))``,

        |d - d*| <= |r| / (2 sqrt(lam N)) =: e,   so   |d - d*| / |d*| <= e / (|d| - e).

    A small relative residual does not imply a small ``e / |d|`` when the right-hand side
    spans many orders of magnitude; this bound does.

    Parameters
    ----------
    residual_norm
        ``|rhs - M x|`` (absolute, same units as ``v``).
    v
        ``J^T x / N`` of the iterate.
    damping, num_samples
        ``lam`` and ``N`` of ``M = J J^T / N + lam I``.
    offset
        ``v0`` when the direction is proportional to ``v - v0``; ``None`` means 0.

    Returns
    -------
    float
        The bound, ``inf`` when it exceeds the direction itself.
    """
    absolute = residual_norm / (2.0 * math.sqrt(damping * num_samples))
    if absolute == 0.0:
        return 0.0
    size = float(torch.linalg.vector_norm(v if offset is None else v - offset))
    if not size > absolute:
        return math.inf
    return absolute / (size - absolute)


def apply_kernel(
    operator: ScoreOperator, x: Tensor, compiled: bool = False
) -> tuple[Tensor, Tensor]:
    """Return ``(v, J v)`` with ``v = J^T x / N``, both float64.

    ``compiled=True`` fuses both products into one ``torch.compile`` graph when the
    operator has a functional form.
    """
    n = operator.num_samples
    functional = operator.functional() if compiled else None
    if functional is not None:
        return fused_kernel(*functional, x, 1.0 / n)
    v = operator.rmatvec(x.to(operator.dtype)).to(torch.float64) / n
    return v, operator.matvec(v.to(operator.dtype)).to(torch.float64)


def operator_rmatvec(operator: ScoreOperator, x: Tensor) -> Tensor:
    """``J^T x`` in float64 for a float64 ``x``."""
    return operator.rmatvec(x.to(operator.dtype)).to(torch.float64)


def operator_matvec(operator: ScoreOperator, v: Tensor, compiled: bool = False) -> Tensor:
    """``J v`` in float64 for a float64 ``v`` (compiled when asked and possible)."""
    functional = operator.functional() if compiled else None
    if functional is not None:
        return fused_matvec(*functional, v)
    return operator.matvec(v.to(operator.dtype)).to(torch.float64)
