"""Solvers of the Woodbury system ``(K / N + lam I) x = A``.

Every solver takes a :class:`~natgrad.scores.ScoreOperator` and a right-hand side and
returns a :class:`SolveResult`.
"""

from natgrad.solvers._base import SolveResult, relative_residual
from natgrad.solvers.cg import cg_solve
from natgrad.solvers.cholesky import cholesky_solve
from natgrad.solvers.dispatch import (
    ON_NONCONVERGENCE,
    SOLVERS,
    NotConvergedError,
    NotConvergedWarning,
    OnNonConvergence,
    SolverName,
    SolverSettings,
    SolverSettingsView,
    seeded_generator,
    solve,
)
from natgrad.solvers.kaczmarz import KaczmarzState, block_factor, kaczmarz_solve, kaczmarz_step

__all__ = [
    "ON_NONCONVERGENCE",
    "SOLVERS",
    "NotConvergedError",
    "NotConvergedWarning",
    "OnNonConvergence",
    "SolverName",
    "SolverSettings",
    "SolverSettingsView",
    "seeded_generator",
    "solve",
    "KaczmarzState",
    "SolveResult",
    "block_factor",
    "cg_solve",
    "cholesky_solve",
    "kaczmarz_solve",
    "kaczmarz_step",
    "relative_residual",
]
