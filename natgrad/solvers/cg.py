"""Conjugate gradient on the ``N x N`` Woodbury system ``(K / N + lam I) x = rhs``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from natgrad.operators import ScoreOperator
from natgrad.solvers._base import SolveResult, direction_error, relative_residual
from natgrad.solvers._products import apply_kernel
from natgrad.solvers.nystrom import nystrom_preconditioner
from natgrad.solvers.registry import Solver, register_solver

if TYPE_CHECKING:
    from natgrad.solvers.options import SolverOptions

_MAX_RESTARTS = 3  # residual replacements when the CG recurrence drifts (float32)


def cg_solve(
    operator: ScoreOperator,
    rhs: Tensor,
    damping: float,
    tol: float,
    max_iters: int,
    compiled: bool = False,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    *,
    direction_offset: Tensor | None = None,
) -> SolveResult:
    """Solve ``(K / N + lam I) x = rhs`` by (preconditioned) conjugate gradient, matrix-free.

    Each iteration costs one ``J^T x`` and one ``J v``; the kernel is never formed.
    CG stops once both the relative residual ``|rhs - M x| / |rhs|`` and the bound on the
    direction's relative error (:func:`~natgrad.solvers._base.direction_error`) are at most
    ``tol``; both are tracked by the recurrence and checked exactly (one extra product)
    before returning.

    Parameters
    ----------
    operator
        The score operator ``J``.
    rhs
        Right-hand side, float64, shape ``(N,)``.
    damping
        ``lam > 0``.
    tol
        Target relative residual and relative direction error.
    max_iters
        Iteration cap.
    compiled
        Fuse the kernel product ``J (J^T x) / N`` with ``torch.compile`` when possible.
    preconditioner
        ``y -> P^{-1} y`` for a symmetric positive definite ``P ~ M`` (see
        :func:`~natgrad.solvers.nystrom.nystrom_preconditioner`); ``None`` is plain CG.
    direction_offset
        ``v0`` when the direction is proportional to ``v - v0`` (supervised push-through
        form); ``None`` for ``d = v``.
    """
    n = operator.num_samples
    x = torch.zeros_like(rhs)
    v = torch.zeros(operator.num_params, dtype=torch.float64, device=rhs.device)
    rhs_norm = float(torch.linalg.vector_norm(rhs))
    if rhs_norm == 0.0:
        return SolveResult(x, v, torch.zeros_like(rhs), 0.0, 0, True, 0.0)

    def accurate(residual_norm: float) -> bool:
        return residual_norm <= tol * rhs_norm and (
            direction_error(residual_norm, v, damping, n, direction_offset) <= tol
        )

    precondition = preconditioner or (lambda y: y)
    residual_vec = rhs.clone()
    iterations = 0
    for _ in range(_MAX_RESTARTS + 1):
        z = precondition(residual_vec)
        direction = z.clone()
        rz = float(residual_vec @ z)
        rr = float(residual_vec @ residual_vec)
        while iterations < max_iters and not accurate(rr**0.5):
            v_dir, jv_dir = apply_kernel(operator, direction, compiled)
            m_dir = jv_dir + damping * direction
            alpha = rz / float(direction @ m_dir)
            x += alpha * direction
            v += alpha * v_dir
            residual_vec -= alpha * m_dir
            rr = float(residual_vec @ residual_vec)
            z = precondition(residual_vec)
            rz_new = float(residual_vec @ z)
            direction = z + (rz_new / rz) * direction
            rz = rz_new
            iterations += 1
        v, jv = apply_kernel(operator, x, compiled)
        residual_vec = rhs - jv - damping * x
        if accurate(float(torch.linalg.vector_norm(residual_vec))) or iterations >= max_iters:
            break
        # The recurrence drifted from the true residual (float32 scores): restart from it.
    residual = relative_residual(rhs, jv, x, damping)
    error = direction_error(residual * rhs_norm, v, damping, n, direction_offset)
    return SolveResult(x, v, jv, residual, iterations, residual <= tol and error <= tol, error)


def solve_cg(
    operator: ScoreOperator,
    rhs: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
    *,
    direction_offset: Tensor | None = None,
) -> SolveResult:
    """:func:`cg_solve` with the Nystrom preconditioner of ``options.preconditioner_rank``."""
    preconditioner = nystrom_preconditioner(
        operator, options.damping, options.preconditioner_rank, generator
    )
    return cg_solve(
        operator,
        rhs,
        options.damping,
        options.tol,
        options.max_iters,
        options.compile,
        preconditioner,
        direction_offset=direction_offset,
    )


register_solver(Solver("cg", solve_cg, compiles=lambda operator: operator.functional() is not None))
