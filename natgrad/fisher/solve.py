"""The damped direction ``d = (W^T W / N + lam I)^{-1} g`` from Fisher rows ``W``.

``W`` has ``R`` rows for ``N`` samples (``R = N m`` with ``m`` rows per sample). The RAT
solvers solve ``(K / R + lam I) x = rhs`` for an operator with ``R`` rows, so the rows are
handed over scaled by ``sqrt(R / N)``: the operator's ``J^T J / R`` is then ``F = W^T W / N``.

* **Kernel form** (``g = W^T u / N`` for known coefficients ``u``):
  ``d = W^T (W W^T / N + lam I)^{-1} u / N``.
* **Push-through form** (``g`` outside the row space of ``W``): by Woodbury,
  ``d = (g - W^T y) / lam`` with ``(W W^T / N + lam I) y = W g / N``.

In the push-through form the solver runs on ``rhs = W g`` (so ``x = N y``) and returns
``v = J^T x / R`` of its scaled rows ``J = s W`` (``s = sqrt(R / N)``); then ``s v = W^T y``
and ``d = (g - s v) / lam``, an affine map of ``v``, which the solvers' stopping rule is
told through ``direction_offset = g / s``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from natgrad.operators import DenseOperator, ScoreOperator, working_dtype
from natgrad.solvers import SolveResult, SolverOptions, solve

Form = Literal["kernel", "push_through"]

__all__ = ["Form", "damped_direction", "solve_damped"]


def damped_direction(
    rows: Tensor,
    num_samples: int,
    gradient: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
    coefficients: Tensor | None = None,
) -> tuple[Tensor, Form, SolveResult, str, list[str]]:
    """Solve for ``d = (W^T W / N + lam I)^{-1} g`` with the solver ``options`` names.

    Parameters
    ----------
    rows
        ``W``, shape ``(R, P)``, in the dtype of the parameters.
    num_samples
        ``N``: the Fisher is ``W^T W / N``.
    gradient
        ``g``, float64, shape ``(P,)``.
    options, generator
        Solver options (``damping`` is ``lam``) and the source of randomness.
    coefficients
        ``u`` (float64, shape ``(R,)``) with ``g = W^T u / N`` for the kernel form;
        ``None`` for the push-through form.

    Returns
    -------
    direction, form, result, solver_used, notes
        ``d`` (float64, shape ``(P,)``), which form was solved, the solve itself (in the
        units of the scaled operator), the solver that ran and its notes.
    """
    scale = math.sqrt(rows.shape[0] / num_samples)
    operator = DenseOperator((rows * scale).to(working_dtype(rows.dtype)))
    operator.score_dtype = rows.dtype
    rhs = None if coefficients is not None else rows.to(torch.float64) @ gradient
    return solve_damped(operator, scale, gradient, options, generator, rhs, coefficients)


def solve_damped(
    operator: ScoreOperator,
    scale: float,
    gradient: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
    rhs: Tensor | None = None,
    coefficients: Tensor | None = None,
) -> tuple[Tensor, Form, SolveResult, str, list[str]]:
    """:func:`damped_direction` for rows already wrapped as an operator of ``s W``.

    Parameters
    ----------
    operator
        ``s W`` with ``s = scale = sqrt(R / N)`` (dense or matrix-free).
    scale
        ``s``.
    gradient, options, generator, coefficients
        As in :func:`damped_direction`.
    rhs
        ``W g`` (float64, shape ``(R,)``) for the push-through form (``coefficients`` None).
    """
    if coefficients is not None:
        result, solver_used, notes = solve(operator, coefficients * scale, options, generator)
        return result.v, "kernel", result, solver_used, notes
    if rhs is None:
        raise ValueError("the push-through form needs rhs = W g")
    result, solver_used, notes = solve(
        operator, rhs, options, generator, direction_offset=gradient / scale
    )
    return (
        (gradient - scale * result.v) / options.damping,
        "push_through",
        result,
        solver_used,
        notes,
    )
