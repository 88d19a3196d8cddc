"""Randomized block Kaczmarz (sketch-and-project) on ``(K / N + lam I) x = rhs``.

With ``M = K / N + lam I`` symmetric positive definite, one step on a block ``S`` of
samples projects the iterate onto ``{x : (M x)_S = rhs_S}`` in the ``M``-inner product
(block Gauss-Seidel). The vector ``v = J^T x / N`` is kept up to date, so each step needs
only the block rows ``J_S``:

    r_S   = rhs_S - (J_S v + lam x_S)
    delta = (J_S J_S^T / N + lam I)^{-1} r_S
    x_S  += delta;   v += J_S^T delta / N

References: Needell & Tropp (2014), "Paved with good intentions: analysis of a randomized
block Kaczmarz method"; Gower & Richtarik (2015), "Randomized iterative methods for linear
systems" (sketch-and-project; the error contracts in the M-norm, Theorem 4.6 there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from natgrad.operators import ScoreBlock, ScoreOperator
from natgrad.solvers._base import SolveResult, cholesky_factor, direction_error, relative_residual
from natgrad.solvers._products import direction_of, operator_matvec
from natgrad.solvers.fused import fused_block_factor, fused_block_step
from natgrad.solvers.registry import Solver, register_solver

if TYPE_CHECKING:
    from natgrad.solvers.options import SolverOptions


@dataclass
class KaczmarzState:
    """Iterate of the block Kaczmarz method: ``x`` and ``v = J^T x / N`` (float64)."""

    x: Tensor
    v: Tensor

    @classmethod
    def zeros(cls, operator: ScoreOperator, device: torch.device) -> KaczmarzState:
        """The starting point ``x = 0``, ``v = 0``."""
        return cls(
            x=torch.zeros(operator.num_samples, dtype=torch.float64, device=device),
            v=torch.zeros(operator.num_params, dtype=torch.float64, device=device),
        )


def block_factor(
    block: ScoreBlock, num_samples: int, damping: float, compiled: bool = False
) -> Tensor:
    """Cholesky factor of the diagonal block ``M_SS = J_S J_S^T / N + lam I`` (float64).

    ``compiled=True`` runs it through ``torch.compile`` when the block has a functional form.
    """
    functional = block.functional() if compiled else None
    if functional is not None:
        try:
            return fused_block_factor(*functional, damping, 1.0 / num_samples)
        except torch.linalg.LinAlgError:
            pass  # redo it eagerly for natgrad's own error
    matrix = block.gram().to(torch.float64) / num_samples
    matrix.diagonal().add_(damping)
    return cholesky_factor(matrix, damping, block.dtype)


def kaczmarz_step(
    state: KaczmarzState,
    block: ScoreBlock,
    index: Tensor,
    rhs: Tensor,
    damping: float,
    factor: Tensor | None = None,
    compiled: bool = False,
) -> Tensor:
    """One block projection, in place on ``state``; returns the block residual ``r_S``.

    Parameters
    ----------
    state
        The iterate, updated in place.
    block
        ``J_S``, the scores of the samples in ``index``.
    index
        The block ``S`` (sample indices).
    rhs
        Right-hand side, float64, shape ``(N,)``.
    damping
        ``lam > 0``.
    factor
        Cholesky factor of ``M_SS`` if already known (see :func:`block_factor`).
    compiled
        Run the whole step as one ``torch.compile`` graph when the block has a functional
        form (:meth:`~natgrad.scores.ScoreBlock.functional`); same result as eager.
    """
    num_samples = state.x.shape[0]
    if factor is None:
        factor = block_factor(block, num_samples, damping, compiled)
    functional = block.functional() if compiled else None
    if functional is not None:
        fns, payload = functional
        x_block, state.v, residual = fused_block_step(
            fns, payload, state.x[index], state.v, rhs[index], factor, damping, 1.0 / num_samples
        )
        state.x[index] = x_block
        return residual
    jv = block.matvec(state.v.to(block.dtype)).to(torch.float64)
    residual = rhs[index] - jv - damping * state.x[index]
    delta = torch.cholesky_solve(residual.unsqueeze(1), factor).squeeze(1)
    state.x[index] += delta
    state.v += block.rmatvec(delta.to(block.dtype)).to(torch.float64) / num_samples
    return residual


def kaczmarz_solve(
    operator: ScoreOperator,
    rhs: Tensor,
    damping: float,
    block_size: int,
    max_epochs: int,
    tol: float,
    generator: torch.Generator,
    resample_blocks: bool = False,
    compiled: bool = False,
    *,
    direction_offset: Tensor | None = None,
) -> SolveResult:
    """Solve ``(K / N + lam I) x = rhs`` by randomized block Kaczmarz.

    The samples are split into blocks by a random permutation (a random paving); each
    epoch visits every block once in a fresh random order. The block factors are
    cached across epochs unless ``resample_blocks`` re-draws the paving every epoch.

    Convergence (relative residual and the bound on the direction's relative error, see
    :func:`~natgrad.solvers._base.direction_error`, both at most ``tol``) is checked
    cheaply from the residuals seen during a sweep and confirmed exactly before stopping:
    ``v = J^T x / N`` is recomputed from ``x`` (the tracked ``v`` accumulates rounding,
    which matters at tiny damping) and then ``J v``.

    Parameters
    ----------
    operator
        The score operator ``J``.
    rhs
        Right-hand side, float64, shape ``(N,)``.
    damping
        ``lam > 0``.
    block_size
        Samples per block; ``block_size >= N`` is one exact solve.
    max_epochs
        Maximum number of sweeps over all blocks.
    tol
        Stop once ``|rhs - M x| / |rhs| <= tol``.
    generator
        Source of all randomness (block paving and order).
    resample_blocks
        Draw a new paving each epoch instead of reusing one.
    compiled
        Use the ``torch.compile`` fused block step (see :func:`kaczmarz_step`).
    direction_offset
        ``v0`` when the direction is proportional to ``v - v0``; ``None`` for ``d = v``.
    """
    num_samples = operator.num_samples
    device = rhs.device
    state = KaczmarzState.zeros(operator, device)
    rhs_norm = float(torch.linalg.vector_norm(rhs))
    if rhs_norm == 0.0:
        return SolveResult(state.x, state.v, torch.zeros_like(rhs), 0.0, 0, True, 0.0)

    def accurate(residual_norm: float) -> bool:
        return residual_norm <= tol * rhs_norm and (
            direction_error(residual_norm, state.v, damping, num_samples, direction_offset) <= tol
        )

    blocks: list[Tensor] = []
    factors: list[Tensor | None] = []
    jv = torch.zeros_like(rhs)
    residual = 1.0
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        if epoch == 1 or resample_blocks:
            perm = torch.randperm(num_samples, generator=generator, device="cpu").to(device)
            blocks = list(perm.split(block_size))
            factors = [None] * len(blocks)
        order = torch.randperm(len(blocks), generator=generator, device="cpu").tolist()
        swept = torch.zeros((), dtype=torch.float64, device=device)
        for k in order:
            block = operator.block(blocks[k])
            if factors[k] is None:
                factors[k] = block_factor(block, num_samples, damping, compiled)
            r = kaczmarz_step(state, block, blocks[k], rhs, damping, factors[k], compiled)
            swept += r @ r  # stays on the device: one synchronization per epoch
            del block  # streaming: free these rows before the next block's are computed
        if accurate(float(swept) ** 0.5) or epoch == max_epochs:
            state.v = direction_of(operator, state.x)
            jv = operator_matvec(operator, state.v, compiled)
            residual = relative_residual(rhs, jv, state.x, damping)
            if accurate(residual * rhs_norm):
                break
    error = direction_error(residual * rhs_norm, state.v, damping, num_samples, direction_offset)
    return SolveResult(
        state.x, state.v, jv, residual, epoch, residual <= tol and error <= tol, error
    )


def solve_kaczmarz(
    operator: ScoreOperator,
    rhs: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
    *,
    direction_offset: Tensor | None = None,
) -> SolveResult:
    """:func:`kaczmarz_solve` with the block size, epochs, tol and paving of ``options``."""
    return kaczmarz_solve(
        operator,
        rhs,
        options.damping,
        options.block_size,
        options.max_epochs,
        options.tol,
        generator,
        options.resample_blocks,
        options.compile,
        direction_offset=direction_offset,
    )


# Every backend's blocks have a functional form (dense rows or factors): always compiled.
register_solver(
    Solver("kaczmarz", solve_kaczmarz, iteration_unit="epochs", compiles=lambda operator: True)
)
