"""The contract every solver of ``(K / N + lam I) x = rhs`` satisfies."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from natgrad.errors import IllConditionedError


@dataclass(frozen=True)
class SolveResult:
    """What a solver returns.

    Attributes
    ----------
    x
        The transformed advantages ``A~`` (float64, shape ``(N,)``).
    v
        ``J^T x / N`` (float64, shape ``(P,)``), the natural-gradient direction.
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
    compiled
        Whether the fused ``torch.compile`` step ran (set by :func:`~natgrad.solvers.solve`).
    """

    x: Tensor
    v: Tensor
    jv: Tensor
    residual: float
    iterations: int
    converged: bool
    direction_error: float | None = None
    condition: float | None = None
    precision: float | None = None
    compiled: bool = False

    def scaled(self, factor: float) -> SolveResult:
        """The same solve for ``factor * rhs`` (the system is linear in the right-hand side)."""
        return replace(self, x=self.x * factor, v=self.v * factor, jv=self.jv * factor)


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
