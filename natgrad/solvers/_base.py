"""The contract every solver of ``(K / N + lam I) x = rhs`` satisfies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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
        Whether ``residual <= tol``.
    """

    x: Tensor
    v: Tensor | None
    jv: Tensor
    residual: float
    iterations: int
    converged: bool


def relative_residual(rhs: Tensor, jv: Tensor, x: Tensor, damping: float) -> float:
    """``|rhs - (J v + lam x)| / |rhs|`` where ``J v = K x / N``."""
    norm = torch.linalg.vector_norm(rhs)
    if float(norm) == 0.0:
        return float(torch.linalg.vector_norm(jv + damping * x))
    return float(torch.linalg.vector_norm(rhs - jv - damping * x) / norm)


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


def operator_matvec(operator: ScoreOperator, v: Tensor, compiled: bool = False) -> Tensor:
    """``J v`` in float64 for a float64 ``v`` (compiled when asked and possible)."""
    functional = operator.functional() if compiled else None
    if functional is not None:
        return fused_matvec(*functional, v)
    return operator.matvec(v.to(operator.dtype)).to(torch.float64)
