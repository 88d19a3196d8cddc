"""Distributed conjugate gradient on ``(K / N + lam I) x = A``, block-Jacobi preconditioned.

Each rank holds its rows of ``x``, the residual and the search direction; ``v = J^T x / N``
is replicated. Per iteration:

* one all-reduce of ``P + 1`` floats: ``J^T p`` and ``|p_k|^2`` (the kernel product and
  the curvature ``p^T M p = N |J^T p / N|^2 + lam |p|^2``);
* one all-reduce of 2 floats: ``r^T r`` and ``r^T z`` of the new residual.

The stopping rule (relative residual and the bound on the direction's error, both at most
``tol``) reads only all-reduced quantities, so every rank takes the same decision.

The preconditioner is block-Jacobi over ranks: each rank approximates its own diagonal
block ``M_kk = K_kk / N + lam I`` by the column-sampling Nystrom preconditioner of its own
samples (:func:`~natgrad.solvers.nystrom.nystrom_preconditioner`), with no communication.
A block-diagonal of symmetric positive definite blocks is symmetric positive definite, so
preconditioned CG keeps its guarantees; with one rank it is the single-process
preconditioner.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from natgrad.distributed.operator import ShardedOperator
from natgrad.solvers._base import SolveResult, direction_error
from natgrad.solvers.nystrom import nystrom_preconditioner

__all__ = ["block_jacobi_preconditioner", "distributed_cg"]

_MAX_RESTARTS = 3


def block_jacobi_preconditioner(
    operator: ShardedOperator, damping: float, rank: int, generator: torch.Generator
) -> Callable[[Tensor], Tensor] | None:
    """``y_k -> P_kk^{-1} y_k`` with ``P_kk`` a rank-``r`` Nystrom model of ``M_kk``.

    ``M_kk = K_kk / N + lam I = (n_k / N) (K_kk / n_k + (lam N / n_k) I)``, so the local
    Nystrom preconditioner at damping ``lam N / n_k``, scaled by ``N / n_k``, models it.
    ``None`` when ``rank`` is 0 (or the local model is empty).
    """
    n, total = operator.num_local, operator.num_samples
    local = nystrom_preconditioner(operator.local, damping * total / n, rank, generator)
    if local is None:
        return None
    scale = total / n
    return lambda y: local(y) * scale


def distributed_cg(
    operator: ShardedOperator,
    rhs: Tensor,
    damping: float,
    tol: float,
    max_iters: int,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> SolveResult:
    """Solve ``(K / N + lam I) x = rhs`` for the union of all ranks' samples by CG.

    Parameters
    ----------
    operator
        The sharded score operator.
    rhs
        This rank's rows of the right-hand side (float64).
    damping, tol, max_iters
        As for :func:`~natgrad.solvers.cg.cg_solve`.
    preconditioner
        This rank's block of a block-diagonal preconditioner (local, no communication).

    Returns
    -------
    SolveResult
        ``x`` and ``jv`` are this rank's rows; ``v`` is the replicated direction;
        ``residual`` and ``converged`` are global (the same on every rank).
    """
    comm, total = operator.comm, operator.num_samples
    x = torch.zeros_like(rhs)
    v = torch.zeros(operator.num_params, dtype=torch.float64, device=rhs.device)
    rhs_norm = operator.norm(rhs)
    if rhs_norm == 0.0:
        return SolveResult(x, v, torch.zeros_like(rhs), 0.0, 0, True, 0.0)

    def accurate(residual_norm: float) -> bool:
        return residual_norm <= tol * rhs_norm and (
            direction_error(residual_norm, v, damping, total) <= tol
        )

    precondition = preconditioner or (lambda y: y)
    residual_vec = rhs.clone()
    jv = torch.zeros_like(rhs)
    residual_norm = rhs_norm
    iterations = 0
    for _ in range(_MAX_RESTARTS + 1):
        comm.phase = "solve"
        z = precondition(residual_vec)
        direction = z.clone()
        rr, rz = comm.sum(residual_vec @ residual_vec, residual_vec @ z)
        while iterations < max_iters and not accurate(max(rr, 0.0) ** 0.5):
            square = (direction @ direction).reshape(1)
            v_dir, jv_dir, sums = operator.kernel(direction, extra=square)
            curvature = total * float(v_dir @ v_dir) + damping * float(sums[0])
            alpha = rz / curvature
            x += alpha * direction
            v += alpha * v_dir
            residual_vec -= alpha * (jv_dir + damping * direction)
            z = precondition(residual_vec)
            rr, rz_new = comm.sum(residual_vec @ residual_vec, residual_vec @ z)
            direction = z + (rz_new / rz) * direction
            rz = rz_new
            iterations += 1
        comm.phase = "check"
        v, jv, _ = operator.kernel(x)
        residual_vec = rhs - jv - damping * x
        residual_norm = operator.norm(residual_vec)
        if accurate(residual_norm) or iterations >= max_iters:
            break
        # the recurrence drifted from the true residual (float32 scores): restart from it
    comm.stats.iterations = iterations
    residual = residual_norm / rhs_norm
    error = direction_error(residual_norm, v, damping, total)
    return SolveResult(x, v, jv, residual, iterations, residual <= tol and error <= tol, error)
