"""The products solvers combine, in float64: ``J^T x / N`` and ``J v``, eager or fused."""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.operators import ScoreOperator
from natgrad.solvers.fused import fused_kernel, fused_matvec


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
    v = direction_of(operator, x)
    return v, operator.matvec(v.to(operator.dtype)).to(torch.float64)


def operator_rmatvec(operator: ScoreOperator, x: Tensor) -> Tensor:
    """``J^T x`` in float64 for a float64 ``x``."""
    return operator.rmatvec(x.to(operator.dtype)).to(torch.float64)


def direction_of(operator: ScoreOperator, x: Tensor) -> Tensor:
    """``v = J^T x / N`` in float64: the direction of the solution ``x``."""
    return operator_rmatvec(operator, x) / operator.num_samples


def operator_matvec(operator: ScoreOperator, v: Tensor, compiled: bool = False) -> Tensor:
    """``J v`` in float64 for a float64 ``v`` (compiled when asked and possible)."""
    functional = operator.functional() if compiled else None
    if functional is not None:
        return fused_matvec(*functional, v)
    return operator.matvec(v.to(operator.dtype)).to(torch.float64)
