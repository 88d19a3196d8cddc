"""Solvers of the Woodbury system ``(K / N + lam I) x = A``.

Every solver sees a :class:`~natgrad.operators.ScoreOperator` only, is registered in
:data:`SOLVER_REGISTRY` with one signature
``(operator, rhs, options, generator, *, direction_offset=None) -> SolveResult``, and is
reached through :func:`solve` (a registry lookup plus the shared checks and policies).
"""

import warnings
from typing import Any

from natgrad.errors import NotConvergedError, NotConvergedWarning

# The built-in solvers register themselves on import, in the order errors list them.
# isort: off
from natgrad.solvers import kaczmarz, cholesky, cg, accelerated_kaczmarz  # noqa: F401

# isort: on
from natgrad.solvers._base import SolveResult, direction_error, relative_residual
from natgrad.solvers.cg import cg_solve
from natgrad.solvers.cholesky import cholesky_solve
from natgrad.solvers.dispatch import SOLVERS, seeded_generator, solve
from natgrad.solvers.kaczmarz import KaczmarzState, block_factor, kaczmarz_solve, kaczmarz_step
from natgrad.solvers.options import (
    ON_NONCONVERGENCE,
    RL_AGENT,
    SUPERVISED,
    OnNonConvergence,
    SolverName,
    SolverOptions,
)
from natgrad.solvers.registry import (
    SOLVER_REGISTRY,
    Solver,
    register_solver,
    solver_names,
    unregister_solver,
)

__all__ = [
    "ON_NONCONVERGENCE",
    "RL_AGENT",
    "SOLVERS",
    "SOLVER_REGISTRY",
    "SUPERVISED",
    "NotConvergedError",
    "NotConvergedWarning",
    "OnNonConvergence",
    "Solver",
    "SolverName",
    "SolverOptions",
    "seeded_generator",
    "solve",
    "register_solver",
    "solver_names",
    "unregister_solver",
    "KaczmarzState",
    "SolveResult",
    "block_factor",
    "direction_error",
    "cg_solve",
    "cholesky_solve",
    "kaczmarz_solve",
    "kaczmarz_step",
    "relative_residual",
]

_DEPRECATED = {"SolverSettings": "SolverOptions", "SolverSettingsView": None}


def __getattr__(name: str) -> Any:
    """Deprecated aliases of natgrad 0.1: ``SolverSettings`` and ``SolverSettingsView``."""
    if name not in _DEPRECATED:
        raise AttributeError(f"module 'natgrad.solvers' has no attribute {name!r}")
    new = _DEPRECATED[name]
    hint = f"use natgrad.solvers.{new}" if new else "read .options instead"
    warnings.warn(f"natgrad.solvers.{name} is deprecated; {hint}", DeprecationWarning, stacklevel=2)
    if new:
        return SolverOptions
    from natgrad.solvers.options import OptionsView

    return OptionsView
