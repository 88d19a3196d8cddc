"""Column-sampling Nystrom preconditioner for CG on ``(K / N + lam I) x = rhs``.

With ``r`` samples ``S`` drawn at random, ``C = K[:, S] / N`` and ``W = K[S, S] / N``,
``K / N ~ C W^+ C^T``; the preconditioner is ``P = C W^+ C^T + lam I``, applied through
Woodbury as ``P^{-1} y = (y - C (lam W + C^T C)^{-1} C^T y) / lam``. It captures the few
large eigenvalues of ``K`` (directions shared by many samples) that make plain CG and
block Kaczmarz slow, at the cost of ``r`` kernel columns and an ``r x r`` factorization.

Reference: Williams & Seeger (2001), "Using the Nystrom method to speed up kernel
machines"; Frangella, Tropp & Udell (2023), "Randomized Nystrom preconditioning".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from natgrad.operators import ScoreOperator


def nystrom_preconditioner(
    operator: ScoreOperator, damping: float, rank: int, generator: torch.Generator
) -> Callable[[Tensor], Tensor] | None:
    """Return ``y -> P^{-1} y`` (float64), or ``None`` when ``rank`` is 0.

    ``rank >= N`` uses every sample: ``P`` is then ``K / N + lam I`` itself and CG finishes
    in one or two iterations (forming all ``N`` columns costs about one Gram matrix).

    ``W`` is shifted by ``nu I`` with ``nu`` at the rounding level of the scores' dtype
    (float32 Gram entries are not exactly positive semidefinite), which keeps ``P``
    symmetric positive definite: it only makes the approximation of ``K`` slightly smaller.
    """
    n = operator.num_samples
    if rank <= 0:
        return None
    rank = min(rank, n)
    index = torch.randperm(n, generator=generator, device="cpu")[:rank].to(operator.device)
    cross = operator.cross_gram(index).to(torch.float64) / n
    core = cross[index]
    core = (core + core.T) / 2
    eps = torch.finfo(operator.dtype).eps
    nu = 4 * eps * rank * float(core.diagonal().abs().max())
    core.diagonal().add_(nu)
    inner = damping * core + cross.T @ cross
    inner = (inner + inner.T) / 2
    factor, info = torch.linalg.cholesky_ex(inner)
    if int(info) == 0:  # the usual case: r x r Cholesky

        def apply(y: Tensor) -> Tensor:
            inner_y = torch.cholesky_solve((cross.T @ y).unsqueeze(1), factor).squeeze(1)
            return (y - cross @ inner_y) / damping

        return apply
    # Still singular (e.g. exactly duplicated samples in float64): pseudo-inverse by
    # eigendecomposition, dropping eigenvalues at the rounding level of the scores.
    values, vectors = torch.linalg.eigh(inner)
    keep = values > 4 * eps * rank * float(values.max().clamp_min(1e-300))
    if not bool(keep.any()):
        return None
    basis = cross @ vectors[:, keep]  # C Q_k, N x k
    scale = 1.0 / values[keep]

    def apply_pinv(y: Tensor) -> Tensor:
        return (y - basis @ (scale * (basis.T @ y))) / damping

    return apply_pinv
