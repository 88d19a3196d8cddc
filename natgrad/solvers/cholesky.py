"""Exact solve of the Woodbury system with one Cholesky factorization of ``K / N + lam I``."""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.scores import ScoreOperator
from natgrad.solvers._base import SolveResult, cholesky_factor, relative_residual


def cholesky_solve(operator: ScoreOperator, rhs: Tensor, damping: float) -> SolveResult:
    """Solve ``(K / N + lam I) x = rhs`` exactly.

    Costs one Gram matrix ``K = J J^T`` (``O(N^2 P)``) and one ``O(N^3 / 3)``
    factorization, in float64 whatever the dtype of ``J``.

    Parameters
    ----------
    operator
        The score operator ``J``.
    rhs
        Right-hand side (the advantages), float64, shape ``(N,)``.
    damping
        ``lam > 0``.

    Raises
    ------
    IllConditionedError
        If ``K / N + lam I`` is not numerically positive definite.

    Returns
    -------
    SolveResult
        ``jv`` uses the identity ``J d = K x / N = rhs - lam x``, exact up to rounding.
    """
    n = operator.num_samples
    kernel = operator.gram().to(torch.float64) / n
    kernel.diagonal().add_(damping)
    factor = cholesky_factor(kernel, damping, operator.score_dtype)
    x = torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
    jv = (kernel @ x) - damping * x
    residual = relative_residual(rhs, jv, x, damping)
    return SolveResult(x=x, v=None, jv=jv, residual=residual, iterations=1, converged=True)
