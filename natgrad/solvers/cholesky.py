"""Exact solve of the Woodbury system with one Cholesky factorization of ``K / N + lam I``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from natgrad.operators import ScoreOperator
from natgrad.solvers._base import SolveResult, cholesky_factor, relative_residual
from natgrad.solvers._products import direction_of
from natgrad.solvers.memory import check_gram_fits
from natgrad.solvers.registry import Solver, register_solver

if TYPE_CHECKING:
    from natgrad.solvers.options import SolverOptions


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
    GramMemoryError
        If the kernel and its factor would not fit in the device's free memory (checked
        before anything is allocated).

    Returns
    -------
    SolveResult
        ``jv`` uses the identity ``J d = K x / N = rhs - lam x``, exact up to rounding;
        ``v = J^T x / N`` costs one more product.
    """
    n = operator.num_samples
    check_gram_fits(n, operator.score_dtype, rhs.device)
    kernel = operator.gram().to(torch.float64) / n
    kernel.diagonal().add_(damping)
    factor = cholesky_factor(kernel, damping, operator.score_dtype)
    x = torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
    jv = (kernel @ x) - damping * x
    residual = relative_residual(rhs, jv, x, damping)
    v = direction_of(operator, x)
    return SolveResult(x=x, v=v, jv=jv, residual=residual, iterations=1, converged=True)


def solve_cholesky(
    operator: ScoreOperator,
    rhs: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
    *,
    direction_offset: Tensor | None = None,
) -> SolveResult:
    """:func:`cholesky_solve` with ``options.damping`` (exact: nothing else applies)."""
    return cholesky_solve(operator, rhs, options.damping)


register_solver(Solver("cholesky", solve_cholesky, iterative=False, needs_gram=True))
