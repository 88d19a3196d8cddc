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

from natgrad.scores import ScoreOperator


def nystrom_preconditioner(
    operator: ScoreOperator, damping: float, rank: int, generator: torch.Generator
) -> Callable[[Tensor], Tensor] | None:
    """Return ``y -> P^{-1} y`` (float64), or ``None`` when ``rank`` is 0 or ``>= N``."""
    n = operator.num_samples
    if rank <= 0 or rank >= n:
        return None
    index = torch.randperm(n, generator=generator, device="cpu")[:rank].to(operator.device)
    cross = operator.cross_gram(index).to(torch.float64) / n
    core = cross[index]
    inner = damping * core + cross.T @ cross
    inner = (inner + inner.T) / 2
    factor, info = torch.linalg.cholesky_ex(inner)
    if int(info) == 0:  # the usual case: r x r Cholesky

        def apply(y: Tensor) -> Tensor:
            inner_y = torch.cholesky_solve((cross.T @ y).unsqueeze(1), factor).squeeze(1)
            return (y - cross @ inner_y) / damping

        return apply
    # Singular: the sampled columns are linearly dependent (rank(K) < r, duplicated
    # samples). Pseudo-inverse by eigendecomposition; the null space of ``inner`` is that
    # of C, which the correction never reaches.
    values, vectors = torch.linalg.eigh(inner)
    keep = values > 1e-12 * float(values.max().clamp_min(1e-300))
    if not bool(keep.any()):
        return None
    basis = cross @ vectors[:, keep]  # C Q_k, N x k
    scale = 1.0 / values[keep]

    def apply_pinv(y: Tensor) -> Tensor:
        return (y - basis @ (scale * (basis.T @ y))) / damping

    return apply_pinv
