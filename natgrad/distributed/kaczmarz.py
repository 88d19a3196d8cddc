r"""Distributed randomized block Kaczmarz: averaged block projections with exact line search.

Every rank draws a block ``B_k`` of its *own* samples and computes the sketch-and-project
step of :mod:`natgrad.solvers.kaczmarz` for it, in parallel:

    r_k     = A_{B_k} - (J_{B_k} v + lam x_{B_k})
    delta_k = (J_{B_k} J_{B_k}^T / N + lam I)^{-1} r_k              (local b x b Cholesky)

``delta_k`` (placed on block ``B_k``) is the ``M``-orthogonal projection ``P_k e`` of the
error ``e = x* - x`` onto the coordinates of ``B_k`` (``M = K / N + lam I``). The steps are
combined as ``x += alpha * sum_k delta_k`` with the step that minimizes ``|e|_M`` along
``Delta = sum_k delta_k``:

    alpha = r^T Delta / Delta^T M Delta
          = sum_k r_k^T delta_k / (|J^T Delta|^2 / N + lam sum_k |delta_k|^2),

computed from one all-reduce of ``[J_{B_k}^T delta_k, r_k^T delta_k, |delta_k|^2,
|r_k|^2]`` (``P + 3`` floats), which also updates the replicated ``v += alpha J^T Delta / N``.
That is the only communication of a step.

Convergence. With ``R`` ranks, ``alpha`` is at least as good as the averaged step
``alpha = 1 / R``, for which convexity of ``|.|_M^2`` gives

    |e - Delta / R|_M^2 <= (1 / R) sum_k |(I - P_k) e|_M^2 = |e|_M^2 - (1 / R) sum_k |P_k e|_M^2,

so ``|e|_M`` never increases, and with blocks drawn uniformly from each rank's paving,
``E |e+|_M^2 <= (1 - sigma / R) |e|_M^2`` with
``sigma = lambda_min(M^{1/2} D M^{1/2}) > 0``, ``D`` the average over the pavings of the
block-diagonal ``M_BB^{-1}`` (positive definite because the pavings cover every sample).
This is the randomized average block Kaczmarz method of Necoara (2019), "Faster randomized
block Kaczmarz algorithms" (SIAM J. Matrix Anal. Appl. 40(4)), with its adaptive
extrapolated step, taken in the ``M``-geometry of sketch-and-project (Gower & Richtarik
2015, "Randomized iterative methods for linear systems"). With one rank ``alpha = 1`` and
it is the single-process block Kaczmarz step.

An epoch is ``max_k ceil(n_k / b)`` steps: each rank visits its blocks in a fresh random
order, a rank with fewer blocks adds blocks drawn at random. The sum of ``|r_k|^2`` over an
epoch (all-reduced with the step) is the cheap stopping test; it is confirmed by an exact
residual (one all-reduce of ``P`` floats and one of a scalar) before stopping.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.distributed.comm import Communicator
from natgrad.distributed.operator import ShardedOperator
from natgrad.errors import ProcessGroupError
from natgrad.solvers._base import SolveResult, direction_error
from natgrad.solvers._products import operator_matvec
from natgrad.solvers.kaczmarz import block_factor

__all__ = ["distributed_kaczmarz"]


def agree(comm: Communicator, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed (``error`` is this rank's failure or ``None``)."""
    (failed,) = comm.sum(0.0 if error is None else 1.0)
    if error is not None:
        raise error
    if failed > 0:
        raise ProcessGroupError(
            f"{int(failed)} other rank(s) of the process group failed during the solve; "
            "see their error messages"
        )


def distributed_kaczmarz(
    operator: ShardedOperator,
    rhs: Tensor,
    damping: float,
    block_size: int,
    max_epochs: int,
    tol: float,
    generator: torch.Generator,
    resample_blocks: bool = False,
) -> SolveResult:
    """Solve ``(K / N + lam I) x = rhs`` for all ranks' samples by averaged block Kaczmarz.

    Each step combines one block projection per rank with the exact line-search step.

    Parameters
    ----------
    operator
        The sharded score operator.
    rhs
        This rank's rows of the right-hand side (float64).
    damping, block_size, max_epochs, tol, resample_blocks
        As for :func:`~natgrad.solvers.kaczmarz.kaczmarz_solve`; blocks are drawn from
        this rank's samples only.
    generator
        This rank's source of randomness (block paving and order).

    Returns
    -------
    SolveResult
        ``x``, ``jv`` are this rank's rows; ``v``, ``residual``, ``converged`` are global.
    """
    comm, total, n, p = operator.comm, operator.num_samples, operator.num_local, operator.num_params
    device = rhs.device
    x = torch.zeros_like(rhs)
    v = torch.zeros(p, dtype=torch.float64, device=device)
    rhs_norm = operator.norm(rhs)
    if rhs_norm == 0.0:
        return SolveResult(x, v, torch.zeros_like(rhs), 0.0, 0, True, 0.0)

    def accurate(residual_norm: float) -> bool:
        return residual_norm <= tol * rhs_norm and (
            direction_error(residual_norm, v, damping, total) <= tol
        )

    steps = max(-(-size // block_size) for size in operator.sizes)
    blocks: list[Tensor] = []
    factors: list[Tensor] = []
    jv = torch.zeros_like(rhs)
    residual_norm, epoch, step_count = rhs_norm, 0, 0
    for epoch in range(1, max_epochs + 1):
        comm.phase = "solve"
        if epoch == 1 or resample_blocks:
            perm = torch.randperm(n, generator=generator, device="cpu").to(device)
            blocks = list(perm.split(block_size))
            failure: BaseException | None = None
            try:
                factors = [block_factor(operator.local.block(b), total, damping) for b in blocks]
            except Exception as error:  # noqa: BLE001 - re-raised on every rank by agree()
                failure = error
            agree(comm, failure)
        order = torch.randperm(len(blocks), generator=generator, device="cpu").tolist()
        extra = steps - len(order)
        if extra > 0:
            order += torch.randint(len(blocks), (extra,), generator=generator).tolist()
        swept = 0.0
        for k in order:
            index = blocks[k]
            block = operator.local.block(index)
            jv_block = block.matvec(v.to(block.dtype)).to(torch.float64)
            r = rhs[index] - jv_block - damping * x[index]
            delta = torch.cholesky_solve(r.unsqueeze(1), factors[k]).squeeze(1)
            local = block.rmatvec(delta.to(block.dtype)).to(torch.float64)
            sums = torch.stack([r @ delta, delta @ delta, r @ r]).to(local.device)
            reduced = comm.all_reduce(torch.cat([local, sums]))
            direction, (r_delta, delta_sq, r_sq) = reduced[:p], reduced[p:].tolist()
            curvature = float(direction @ direction) / total + damping * delta_sq
            alpha = r_delta / curvature if curvature > 0.0 else 0.0
            x[index] += alpha * delta
            v += (alpha / total) * direction
            swept += r_sq
            step_count += 1
            del block
        if accurate(max(swept, 0.0) ** 0.5) or epoch == max_epochs:
            comm.phase = "check"
            v, _ = operator.direction(x)  # the tracked v accumulates rounding: recompute it
            jv = operator_matvec(operator.local, v)
            residual_norm = operator.norm(rhs - jv - damping * x)
            if accurate(residual_norm):
                break
    comm.stats.iterations = step_count
    residual = residual_norm / rhs_norm
    error = direction_error(residual_norm, v, damping, total)
    return SolveResult(x, v, jv, residual, epoch, residual <= tol and error <= tol, error)
