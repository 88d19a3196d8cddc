"""One entry point for every solver, with the shared non-convergence policy."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from natgrad._checks import (
    check_bool,
    check_choice,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
    is_integer,
)
from natgrad.errors import (
    IllConditionedError,
    NotConvergedError,
    NotConvergedWarning,
    PrecisionWarning,
)
from natgrad.scores import ScoreOperator
from natgrad.solvers._base import SolveResult, operator_rmatvec
from natgrad.solvers.cg import cg_solve
from natgrad.solvers.cholesky import cholesky_solve
from natgrad.solvers.conditioning import Conditioning, estimate_conditioning
from natgrad.solvers.kaczmarz import kaczmarz_solve
from natgrad.solvers.nystrom import nystrom_preconditioner

SolverName = Literal["auto", "kaczmarz", "cholesky", "cg"]
OnNonConvergence = Literal["fallback", "warn", "raise"]
SOLVERS: tuple[str, ...] = ("auto", "kaczmarz", "cholesky", "cg")
# solver="auto" solves exactly (Cholesky) on a GPU up to this many samples, else uses CG:
# the fastest to a cosine of 0.99 in benchmarks/solvers (results/ for CPU, results/cuda-h100/).
AUTO_CHOLESKY_MAX_SAMPLES = 4096
ON_NONCONVERGENCE: tuple[str, ...] = ("fallback", "warn", "raise")


@dataclass(frozen=True)
class SolverSettings:
    """Validated solver options (see :class:`natgrad.RATNaturalGradient` for meanings)."""

    solver: str
    damping: float
    block_size: int
    max_epochs: int
    tol: float
    max_iters: int
    on_nonconvergence: str = "fallback"
    resample_blocks: bool = False
    compile: bool = False
    preconditioner_rank: int = 0

    @classmethod
    def validated(
        cls,
        *,
        solver: str,
        damping: float,
        block_size: int,
        max_epochs: int,
        tol: float,
        max_iters: int,
        on_nonconvergence: str = "fallback",
        resample_blocks: bool = False,
        compile: bool = False,
        preconditioner_rank: int = 0,
    ) -> SolverSettings:
        """Check user-given options once, with errors that name the option and the fix."""
        return cls(
            solver=check_choice("solver", solver, SOLVERS),
            damping=check_positive_float(
                "damping", damping, "; typical values are 1e-4..1e-1 (units of F = J^T J / N)"
            ),
            block_size=check_positive_int("block_size", block_size, "; try 512"),
            max_epochs=check_positive_int("max_epochs", max_epochs),
            tol=check_positive_float("tol", tol, "; e.g. 1e-2 (relative residual)"),
            max_iters=check_positive_int("max_iters", max_iters),
            on_nonconvergence=check_choice(
                "on_nonconvergence", on_nonconvergence, ON_NONCONVERGENCE
            ),
            resample_blocks=bool(resample_blocks),
            compile=check_bool("compile", compile),
            preconditioner_rank=check_nonnegative_int(
                "preconditioner_rank", preconditioner_rank, "; 0 turns it off, e.g. 128"
            ),
        )


class SolverSettingsView:
    """Read-only attributes (``damping``, ``solver``, ...) of an object's ``settings``."""

    settings: SolverSettings

    damping = property(lambda self: self.settings.damping, doc="Tikhonov damping ``lam``.")
    solver = property(lambda self: self.settings.solver, doc="The requested solver.")
    block_size = property(lambda self: self.settings.block_size, doc="Kaczmarz block size.")
    max_epochs = property(lambda self: self.settings.max_epochs, doc="Kaczmarz epoch cap.")
    tol = property(lambda self: self.settings.tol, doc="Relative-residual tolerance.")
    max_iters = property(lambda self: self.settings.max_iters, doc="CG iteration cap.")
    on_nonconvergence = property(lambda self: self.settings.on_nonconvergence)
    resample_blocks = property(lambda self: self.settings.resample_blocks)
    compile = property(lambda self: self.settings.compile, doc="Whether the fused path is on.")
    preconditioner_rank = property(lambda self: self.settings.preconditioner_rank)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from the operating system when ``None``."""
    if seed is not None:
        if not is_integer(seed):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        seed = int(seed)
    generator = torch.Generator()
    generator.manual_seed(
        seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    )
    return generator


def resolve_solver(solver: str, operator: ScoreOperator) -> str:
    """The concrete solver for ``solver`` (``"auto"``: Cholesky on GPU for small N, else CG).

    ``"auto"`` picks Cholesky only when ``J J^T`` is cheap to form (factored or materialized
    backend), the operator lives on a CUDA device and ``N <= AUTO_CHOLESKY_MAX_SAMPLES``.
    """
    if solver != "auto":
        return solver
    on_gpu = getattr(operator, "device", torch.device("cpu")).type == "cuda"
    cheap_gram = operator.backend in ("factored", "materialized")
    small = operator.num_samples <= AUTO_CHOLESKY_MAX_SAMPLES
    return "cholesky" if (on_gpu and cheap_gram and small) else "cg"


def solve(
    operator: ScoreOperator,
    rhs: Tensor,
    settings: SolverSettings,
    generator: torch.Generator,
    *,
    direction_offset: Tensor | None = None,
    want_direction: bool = False,
) -> tuple[SolveResult, str, list[str]]:
    """Solve ``(K / N + lam I) x = rhs`` with the configured solver.

    The system is solved for ``rhs / max|rhs|`` and the solution scaled back, so that no
    scale of the right-hand side (1e-300 to 1e300) underflows or overflows inside a solver.
    Before solving, the conditioning is estimated against the scores' precision
    (:func:`~natgrad.solvers.conditioning.estimate_conditioning`).

    Parameters
    ----------
    operator, rhs, settings, generator
        The score operator, the float64 right-hand side, the options and the source of
        randomness.
    direction_offset
        ``v0`` when the direction is proportional to ``v - v0`` (in the units of ``rhs``);
        used by the stopping rule's direction-error bound.
    want_direction
        Also form ``v = J^T x / N`` when the solver did not (Cholesky), at unit scale.

    Returns
    -------
    result, solver_used, notes
        The solve (with ``condition`` and ``precision`` set); the solver that produced it
        (``"cholesky"`` after a fallback); and human-readable notes on fallbacks or warnings.

    Raises
    ------
    NotConvergedError
        If an iterative solver stops above ``tol`` and ``on_nonconvergence="raise"``.
    IllConditionedError
        If rounding of the scores alone can make the answer wrong by 100% or more
        (``cond(M) * eps >= 1``), or ``M`` is numerically singular.
    """
    s = settings
    name = resolve_solver(s.solver, operator)
    scale = float(rhs.abs().max())
    if scale == 0.0:
        zero = torch.zeros_like(rhs)
        v = torch.zeros(operator.num_params, dtype=torch.float64, device=rhs.device)
        return SolveResult(zero, v, zero, 0.0, 0, True, 0.0, 1.0, 0.0), name, []
    conditioning = estimate_conditioning(operator, s.damping, s.tol, s.compile)
    notes = _precision_notes(operator, conditioning, s)
    unit_rhs = rhs / scale
    offset = None if direction_offset is None else direction_offset / scale
    result, name, more = _solve_unit(operator, unit_rhs, s, generator, name, offset)
    if want_direction and result.v is None:
        result = replace(result, v=operator_rmatvec(operator, result.x) / operator.num_samples)
    result = replace(
        result.scaled(scale),
        condition=conditioning.condition,
        precision=conditioning.precision,
    )
    return result, name, notes + more


def _precision_notes(
    operator: ScoreOperator, conditioning: Conditioning, settings: SolverSettings
) -> list[str]:
    """Refuse (rounded products >= 100% off) or warn (precision > tol) when rounding limits."""
    if conditioning.product_error < 1.0 and conditioning.precision <= settings.tol:
        return []
    eps_work = torch.finfo(operator.dtype).eps
    eps_score = torch.finfo(operator.score_dtype).eps
    dtype = str(operator.score_dtype).removeprefix("torch.")
    where = (
        f"cond(K/N + damping I) ~ {conditioning.condition:.2g} with {dtype} scores "
        f"(largest eigenvalue of K/N ~ {conditioning.largest_eigenvalue:.3g}, "
        f"damping={settings.damping:g})"
    )
    target = min(settings.tol, 0.5)
    fix = f"use damping >= {conditioning.minimum_damping(eps_work, eps_score, target):.2g}" + (
        "" if operator.score_dtype == torch.float64 else " or float64 parameters"
    )
    if not conditioning.product_error < 1.0:
        raise IllConditionedError(
            f"{where}: rounding alone can make A~ and the direction wrong by 100% or more, "
            f"so natgrad refuses to solve; {fix}"
        )
    message = (
        f"{where}: rounding alone may leave a relative error up to "
        f"{conditioning.precision:.2g} > tol={settings.tol:g} in A~ and the direction; {fix}"
    )
    warnings.warn(message, PrecisionWarning, stacklevel=4)
    return [message]


def _solve_unit(
    operator: ScoreOperator,
    rhs: Tensor,
    s: SolverSettings,
    generator: torch.Generator,
    name: str,
    offset: Tensor | None,
) -> tuple[SolveResult, str, list[str]]:
    """Run solver ``name`` on a right-hand side of order one, then apply the policy."""
    if name == "cholesky":
        return cholesky_solve(operator, rhs, s.damping), "cholesky", []
    if name == "cg":
        preconditioner = nystrom_preconditioner(
            operator, s.damping, s.preconditioner_rank, generator
        )
        result = cg_solve(
            operator,
            rhs,
            s.damping,
            s.tol,
            s.max_iters,
            s.compile,
            preconditioner,
            direction_offset=offset,
        )
    else:
        result = kaczmarz_solve(
            operator,
            rhs,
            s.damping,
            s.block_size,
            s.max_epochs,
            s.tol,
            generator,
            s.resample_blocks,
            s.compile,
            direction_offset=offset,
        )
    if result.converged:
        return result, name, []
    unit = "epochs" if name == "kaczmarz" else "iterations"
    if result.residual > s.tol:
        what = f"relative residual {result.residual:.3g}"
    else:
        what = f"direction error bound {result.direction_error:.3g}"
    message = f"solver={name!r} stopped at {what} > tol={s.tol:g} after {result.iterations} {unit}"
    if s.on_nonconvergence == "raise":
        raise NotConvergedError(
            message + "; raise max_epochs/max_iters, raise damping, loosen tol, or use "
            "solver='cholesky'"
        )
    if s.on_nonconvergence == "warn":
        warnings.warn(message, NotConvergedWarning, stacklevel=5)
        return result, name, [message]
    exact = cholesky_solve(operator, rhs, s.damping)
    exact = replace(exact, iterations=result.iterations)
    return exact, "cholesky", [message + "; solved exactly with cholesky instead"]
