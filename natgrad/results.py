"""Values returned by :class:`natgrad.RATNaturalGradient`: diagnostics and the direction."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from natgrad.errors import ArgumentError

if TYPE_CHECKING:
    from natgrad.solvers import SolveResult


@dataclass(frozen=True)
class Diagnostics:
    """What happened in one call of :class:`~natgrad.RATNaturalGradient`.

    Attributes
    ----------
    solver
        The solver that produced the answer (``"kaczmarz"``, ``"cholesky"`` or ``"cg"``);
        differs from the requested one after a fallback.
    backend
        ``"factored"`` (linear layers as input/output-gradient factors), ``"materialized"``
        (``J`` held in memory) or ``"streaming"`` (rows recomputed per block).
    score_path
        ``"vmap"`` (batched per-sample gradients) or ``"loop"`` (one sample at a time,
        used when ``vmap`` cannot batch an operation of the policy).
    residual
        Relative residual ``|A - (K/N + lam I) A~| / |A|`` of the returned ``A~``.
    iterations
        Kaczmarz epochs, CG iterations, or 1 for Cholesky (of the requested solver; a
        fallback adds nothing here); 0 when no solve was needed (``A = 0``, or every score
        zero for an iterative solver: ``A~ = A / lam``, noted in ``fallbacks``).
    converged
        Whether the returned answer meets ``tol``: ``residual <= tol`` and, for the
        iterative solvers, ``direction_error <= tol``. Cholesky is exact up to rounding
        (see ``precision``).
    seconds
        Wall time of the whole call.
    fallbacks
        Human-readable notes on every fallback taken (empty when none).
    num_samples, num_params
        ``N`` and ``P``.
    compiled
        Whether the iterative solver ran its ``torch.compile`` fused step.
    direction_error
        Guaranteed bound on ``|d - d*| / |d*|`` (``d*`` the exact solution of the damped
        system) from the final residual; ``None`` for Cholesky.
    condition
        Estimate of ``cond(J J^T / N + lam I)``.
    precision
        Relative error that rounding alone may cause in ``A~`` and ``d`` (a worst-case
        estimate from ``condition`` and the dtypes); a :class:`~natgrad.PrecisionWarning`
        is issued when it exceeds ``tol``.
    """

    solver: str
    backend: str
    score_path: str
    residual: float
    iterations: int
    converged: bool
    seconds: float
    fallbacks: tuple[str, ...]
    num_samples: int
    num_params: int
    compiled: bool = False
    direction_error: float | None = None
    condition: float | None = None
    precision: float | None = None

    @classmethod
    def of_solve(
        cls,
        result: SolveResult,
        *,
        solver: str,
        backend: str,
        score_path: str,
        fallbacks: Sequence[str],
        num_samples: int,
        num_params: int,
        started: float,
        compiled: bool | None = None,
    ) -> Diagnostics:
        """The diagnostics of a finished solve; ``started`` is its ``time.perf_counter()``.

        ``compiled`` defaults to the result's own flag.
        """
        return cls(
            solver=solver,
            backend=backend,
            score_path=score_path,
            residual=result.residual,
            iterations=result.iterations,
            converged=result.converged,
            seconds=time.perf_counter() - started,
            fallbacks=tuple(fallbacks),
            num_samples=num_samples,
            num_params=num_params,
            compiled=result.compiled if compiled is None else compiled,
            direction_error=result.direction_error,
            condition=result.condition,
            precision=result.precision,
        )


@dataclass(frozen=True)
class NaturalGradient:
    """The natural-gradient direction and its free by-products (see the derivation page).

    Attributes
    ----------
    advantages
        Transformed advantages ``A~``, detached, shaped like the input ``adv``; ``None``
        with ``fisher="expected"`` (the direction is not in the span of the sampled scores).
    direction
        ``d = (F + lam I)^{-1} g``, one tensor per selected parameter (same shapes).
        Ascent direction of the surrogate ``mean(A * log pi)``.
    param_names
        Names of the selected parameters, matching ``direction``.
    jd
        ``J d`` (shape ``(N,)``): the first-order change of each sample's log-probability
        per unit step along ``d``.
    g_dot_d
        ``g^T d``: first-order improvement of the surrogate per unit step.
    d_fisher_d
        ``d^T F d``: curvature of the KL divergence along ``d`` (``KL ~ eta^2 dFd / 2``).
    diagnostics
        The :class:`Diagnostics` of the call.
    """

    advantages: Tensor | None
    direction: tuple[Tensor, ...]
    param_names: tuple[str, ...]
    jd: Tensor
    g_dot_d: float
    d_fisher_d: float
    diagnostics: Diagnostics

    def step_size(self, max_kl: float) -> float:
        """Step ``eta = sqrt(2 max_kl / d^T F d)`` whose quadratic KL model equals ``max_kl``.

        Parameters
        ----------
        max_kl
            Target KL divergence between the old and the updated policy.

        Returns
        -------
        float
            ``eta``; ``0.0`` if the direction is zero.
        """
        if not (math.isfinite(max_kl) and max_kl > 0):
            raise ArgumentError(f"max_kl must be a finite float > 0, got {max_kl!r}")
        if self.d_fisher_d <= 0.0:
            return 0.0
        return math.sqrt(2.0 * max_kl / self.d_fisher_d)
