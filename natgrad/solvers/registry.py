"""The solver registry: each solver is one module that registers a :class:`Solver`.

A solver is a function with one signature,
``(operator, rhs, options, generator, *, direction_offset=None) -> SolveResult``, plus the
metadata :func:`~natgrad.solvers.solve` needs: what its iterations count, whether it can
miss ``tol``, when ``compile=True`` applies, whether it forms the Gram matrix. Registering
makes the name valid for ``solver=`` in every entry point (``RATNaturalGradient``, the
supervised API, the RL agents).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from natgrad.errors import ArgumentError
from natgrad.operators import ScoreOperator

if TYPE_CHECKING:
    from natgrad.solvers._base import SolveResult
    from natgrad.solvers.options import SolverOptions

__all__ = [
    "SOLVER_REGISTRY",
    "Solver",
    "SolverFunction",
    "register_solver",
    "solver_names",
    "unregister_solver",
]


class SolverFunction(Protocol):
    """``(operator, rhs, options, generator, *, direction_offset=None) -> SolveResult``."""

    def __call__(
        self,
        operator: ScoreOperator,
        rhs: Tensor,
        options: SolverOptions,
        generator: torch.Generator,
        *,
        direction_offset: Tensor | None = None,
    ) -> SolveResult: ...


@dataclass(frozen=True)
class Solver:
    """A registered solver of ``(K / N + lam I) x = rhs`` and what dispatch needs to know.

    Attributes
    ----------
    name
        The ``solver=`` value that selects it.
    solve
        The solver function (see :class:`SolverFunction`). It receives a right-hand side of
        order one (``max |rhs| = 1``) and sets ``converged`` by the options' ``tol``.
    iteration_unit
        What ``SolveResult.iterations`` counts (``"epochs"``, ``"iterations"``), for messages.
    iterative
        Whether it can stop above ``tol`` (then ``on_nonconvergence`` applies).
    compiles
        ``operator -> bool``: whether ``compile=True`` runs a fused step on this operator;
        ``None``: the solver has no compiled path.
    needs_gram
        Whether it forms the ``N x N`` Gram matrix (cheap only on some backends).
    """

    name: str
    solve: SolverFunction
    iteration_unit: str = "iterations"
    iterative: bool = True
    compiles: Callable[[ScoreOperator], bool] | None = None
    needs_gram: bool = False


SOLVER_REGISTRY: dict[str, Solver] = {}


def register_solver(solver: Solver) -> Solver:
    """Make ``solver`` selectable as ``solver=solver.name`` everywhere; returns it."""
    if solver.name == "auto" or not solver.name.isidentifier():
        raise ArgumentError(
            f"solver name must be an identifier other than 'auto', got {solver.name!r}"
        )
    SOLVER_REGISTRY[solver.name] = solver
    return solver


def unregister_solver(name: str) -> None:
    """Remove a registered solver (tests and examples clean up with it)."""
    SOLVER_REGISTRY.pop(name, None)


def solver_names() -> tuple[str, ...]:
    """Every valid ``solver=`` value: ``"auto"`` then the registered solvers, in order."""
    return ("auto", *SOLVER_REGISTRY)
