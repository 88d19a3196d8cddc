"""One entry point for every solver, with the shared non-convergence policy."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from natgrad._checks import (
    check_bool,
    check_choice,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
)
from natgrad.errors import NotConvergedError, NotConvergedWarning
from natgrad.scores import ScoreOperator
from natgrad.solvers._base import SolveResult
from natgrad.solvers.cg import cg_solve
from natgrad.solvers.cholesky import cholesky_solve
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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
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
) -> tuple[SolveResult, str, list[str]]:
    """Solve ``(K / N + lam I) x = rhs`` with the configured solver.

    Returns
    -------
    result, solver_used, notes
        The solve; the solver that produced it (``"cholesky"`` after a fallback); and
        human-readable notes on fallbacks or warnings.

    Raises
    ------
    NotConvergedError
        If an iterative solver stops above ``tol`` and ``on_nonconvergence="raise"``.
    """
    s = settings
    name = resolve_solver(s.solver, operator)
    if name == "cholesky":
        return cholesky_solve(operator, rhs, s.damping), "cholesky", []
    if name == "cg":
        preconditioner = (
            nystrom_preconditioner(operator, s.damping, s.preconditioner_rank, generator)
            if bool(rhs.any())
            else None
        )
        result = cg_solve(operator, rhs, s.damping, s.tol, s.max_iters, s.compile, preconditioner)
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
        )
    if result.converged:
        return result, name, []
    unit = "epochs" if name == "kaczmarz" else "iterations"
    message = (
        f"solver={name!r} stopped at relative residual {result.residual:.3g} > "
        f"tol={s.tol:g} after {result.iterations} {unit}"
    )
    if s.on_nonconvergence == "raise":
        raise NotConvergedError(
            message + "; raise max_epochs/max_iters, raise damping, loosen tol, or use "
            "solver='cholesky'"
        )
    if s.on_nonconvergence == "warn":
        warnings.warn(message, NotConvergedWarning, stacklevel=4)
        return result, name, [message]
    exact = cholesky_solve(operator, rhs, s.damping)
    exact = SolveResult(exact.x, None, exact.jv, exact.residual, result.iterations, True)
    return exact, "cholesky", [message + "; solved exactly with cholesky instead"]
