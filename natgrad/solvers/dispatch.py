"""One entry point for every solver, with the shared checks and policies.

:func:`solve` looks the solver up in the registry, normalizes the right-hand side, checks
the conditioning and applies the non-convergence policy.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import replace

import torch
from torch import Tensor

from natgrad._checks import is_integer
from natgrad.errors import (
    ArgumentError,
    ArgumentTypeError,
    GramMemoryError,
    IllConditionedError,
    NotConvergedError,
    NotConvergedWarning,
    PrecisionWarning,
)
from natgrad.operators import ScoreOperator
from natgrad.solvers._base import SolveResult, relative_residual
from natgrad.solvers._products import direction_of, operator_matvec
from natgrad.solvers.conditioning import Conditioning, estimate_conditioning
from natgrad.solvers.options import SolverOptions
from natgrad.solvers.registry import SOLVER_REGISTRY, solver_names

# solver="auto" solves exactly (Cholesky) on a GPU up to this many samples, else uses CG:
# the fastest to a cosine of 0.99 in benchmarks/solvers (results/ for CPU, results/cuda-h100/).
AUTO_CHOLESKY_MAX_SAMPLES = 4096
# On CPU, "auto" solves exactly while N < AUTO_CHOLESKY_CPU_RANKS * preconditioner_rank: CG's
# Nystrom sketch alone would form more than half of the N kernel columns, and the exact solve
# measured faster (benchmarks/solvers/call_profile.py, results/call_profile.json "crossover").
AUTO_CHOLESKY_CPU_RANKS = 2
# The built-in solver= values; solver_names() also lists solvers registered since.
SOLVERS: tuple[str, ...] = solver_names()


# The largest seed torch.Generator.manual_seed takes (an unsigned 64-bit integer).
MAX_SEED = 2**64 - 1

# natgrad's own source files: a warning points at the first frame outside them.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes the caller's ``warnings.warn`` point at the user's line.

    The caller's frame is level 1; levels count up through natgrad's frames (``rat(...)``,
    ``rat.natural_gradient(...)``, the expected-Fisher and data-parallel paths reach the
    solvers at different depths) to the first frame outside the package.
    """
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from the operating system when ``None``.

    ``seed`` must fit torch's unsigned 64-bit seeds: ``manual_seed`` overflows above
    ``2**64 - 1`` and silently wraps a negative seed onto a large one (``-1`` is
    ``2**64 - 1``), so both are refused.
    """
    if seed is not None:
        if not is_integer(seed):
            raise ArgumentTypeError(f"seed must be an int or None, got {seed!r}")
        seed = int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise ArgumentError(
                f"seed must be an integer in [0, 2**64 - 1] or None, got {seed}: torch's "
                "generators take unsigned 64-bit seeds; pass e.g. seed % 2**64, or None to "
                "seed from the operating system"
            )
    generator = torch.Generator()
    generator.manual_seed(
        seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    )
    return generator


def auto_solver(
    device: torch.device, backend: str, num_samples: int, preconditioner_rank: int
) -> str:
    """What ``solver="auto"`` runs: ``"cholesky"`` or ``"cg"``.

    Cholesky only when ``J J^T`` is cheap to form (factored or materialized backend, not
    streaming) and either the device is CUDA with ``N <= AUTO_CHOLESKY_MAX_SAMPLES``, or
    the device is a CPU with ``N < AUTO_CHOLESKY_CPU_RANKS * preconditioner_rank`` (CG's
    Nystrom sketch would form more than half of the kernel anyway).
    """
    if backend not in ("factored", "materialized"):  # streaming recomputes rows
        return "cg"
    if device.type == "cuda":
        return "cholesky" if num_samples <= AUTO_CHOLESKY_MAX_SAMPLES else "cg"
    return "cholesky" if num_samples < AUTO_CHOLESKY_CPU_RANKS * preconditioner_rank else "cg"


def resolve_solver(solver: str, operator: ScoreOperator, preconditioner_rank: int = 0) -> str:
    """The concrete solver for ``solver`` (``"auto"``: see :func:`auto_solver`)."""
    if solver != "auto":
        return solver
    device = getattr(operator, "device", torch.device("cpu"))
    return auto_solver(device, operator.backend, operator.num_samples, preconditioner_rank)


def solve(
    operator: ScoreOperator,
    rhs: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
    *,
    direction_offset: Tensor | None = None,
) -> tuple[SolveResult, str, list[str]]:
    """Solve ``(K / N + lam I) x = rhs`` with the solver that ``options`` names.

    The system is solved for ``rhs / max|rhs|`` and the solution scaled back, so that no
    scale of the right-hand side (1e-300 to 1e300) underflows or overflows inside a solver.
    Before solving, the conditioning is estimated against the scores' precision
    (:func:`~natgrad.solvers.conditioning.estimate_conditioning`).

    Parameters
    ----------
    operator, rhs, options, generator
        The score operator, the float64 right-hand side, the :class:`SolverOptions` and the
        source of randomness.
    direction_offset
        ``v0`` when the direction is proportional to ``v - v0`` (in the units of ``rhs``);
        used by the stopping rule's direction-error bound.

    Returns
    -------
    result, solver_used, notes
        The solve (with ``v = J^T x / N``, ``condition``, ``precision`` and ``compiled``
        set); the solver that produced it (``"cholesky"`` after a fallback); and
        human-readable notes on fallbacks or warnings.

    Raises
    ------
    NotConvergedError
        If an iterative solver stops above ``tol`` and ``on_nonconvergence="raise"``.
    IllConditionedError
        If rounding of the scores alone can make the answer wrong by 100% or more
        (``cond(M) * eps >= 1``), or ``M`` is numerically singular.
    """
    name = resolve_solver(options.solver, operator, options.preconditioner_rank)
    scale = float(rhs.abs().max())
    if scale == 0.0:
        zero = torch.zeros_like(rhs)
        v = torch.zeros(operator.num_params, dtype=torch.float64, device=rhs.device)
        return SolveResult(zero, v, zero, 0.0, 0, True, 0.0, 1.0, 0.0), name, []
    conditioning = estimate_conditioning(operator, options.damping, options.tol, options.compile)
    notes = _precision_notes(operator, conditioning, options)
    unit_rhs = rhs / scale
    offset = None if direction_offset is None else direction_offset / scale
    if conditioning.kernel_vanishes and SOLVER_REGISTRY[name].iterative:
        result, more = _solve_vanishing_kernel(operator, unit_rhs, options, name)
        compiled, compile_note = False, []
    else:
        result, name, more = _solve_unit(operator, unit_rhs, options, generator, name, offset)
        compiled, compile_note = _compiled(operator, options, name)
    result = replace(
        result.scaled(scale),
        condition=conditioning.condition,
        precision=conditioning.precision,
        compiled=compiled,
    )
    return result, name, notes + more + compile_note


def vanishing_kernel_note(name: str) -> str:
    """The note of a solve skipped because every score is zero (``trace(K) = 0``)."""
    return (
        "every score (row of J) is zero, trace(K) = 0: K/N + damping I is damping I, "
        f"solved exactly by a division (A~ = A / damping, the direction is 0) without running "
        f"solver={name!r}; if that is unexpected, check that the selected parameters affect "
        "the output"
    )


def _solve_vanishing_kernel(
    operator: ScoreOperator, rhs: Tensor, options: SolverOptions, name: str
) -> tuple[SolveResult, list[str]]:
    """The solve of ``lam x = rhs`` (``K = 0``): ``x = rhs / lam``, exactly.

    The iterative solvers cannot certify it: their bound on the direction's relative error
    is infinite when the direction is 0. Exact like Cholesky (converged, rounding aside);
    ``v`` and ``J v`` are still formed, so the residual reported is measured.
    """
    x = rhs / options.damping
    v = direction_of(operator, x)
    jv = operator_matvec(operator, v)
    residual = relative_residual(rhs, jv, x, options.damping)
    return SolveResult(x, v, jv, residual, 0, True, 0.0), [vanishing_kernel_note(name)]


def _compiled(operator: ScoreOperator, options: SolverOptions, name: str) -> tuple[bool, list[str]]:
    """Whether the solver that ran used its fused step, and a note when it could not."""
    compiles = SOLVER_REGISTRY[name].compiles
    if not options.compile or compiles is None:
        return False, []
    if compiles(operator):
        return True, []
    return False, [
        f"compile=True: solver={name!r} on the {operator.backend} backend has no fused form; "
        "ran eagerly (solver='kaczmarz' compiles its block steps on every backend)"
    ]


def _precision_notes(
    operator: ScoreOperator, conditioning: Conditioning, options: SolverOptions
) -> list[str]:
    """Refuse (rounded products >= 100% off) or warn (precision > tol) when rounding limits."""
    if conditioning.product_error < 1.0 and conditioning.precision <= options.tol:
        return []
    eps_work = torch.finfo(operator.dtype).eps
    eps_score = torch.finfo(operator.score_dtype).eps
    dtype = str(operator.score_dtype).removeprefix("torch.")
    where = (
        f"cond(K/N + damping I) ~ {conditioning.condition:.2g} with {dtype} scores "
        f"(largest eigenvalue of K/N ~ {conditioning.largest_eigenvalue:.3g}, "
        f"damping={options.damping:g})"
    )
    target = min(options.tol, 0.5)
    smallest = conditioning.minimum_damping(eps_work, eps_score, target)
    if math.isfinite(smallest):
        fix = f"use damping >= {smallest:.2g}" + (
            "" if operator.score_dtype == torch.float64 else " or float64 parameters"
        )
    else:
        fix = (
            f"tol={options.tol:g} is below what {dtype} scores can deliver at any damping; "
            "loosen tol or use float64 parameters"
        )
    if not conditioning.product_error < 1.0:
        raise IllConditionedError(
            f"{where}: rounding alone can make A~ and the direction wrong by 100% or more, "
            f"so natgrad refuses to solve; {fix}"
        )
    message = (
        f"{where}: rounding alone may leave a relative error up to "
        f"{conditioning.precision:.2g} > tol={options.tol:g} in A~ and the direction; {fix}"
    )
    warnings.warn(message, PrecisionWarning, stacklevel=_user_stacklevel())
    return [message]


def _solve_unit(
    operator: ScoreOperator,
    rhs: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
    name: str,
    offset: Tensor | None,
) -> tuple[SolveResult, str, list[str]]:
    """Run solver ``name`` on a right-hand side of order one, then apply the policy."""
    solver = SOLVER_REGISTRY[name]
    result = solver.solve(operator, rhs, options, generator, direction_offset=offset)
    if result.converged or not solver.iterative:
        return result, name, []
    if result.residual > options.tol:
        what = f"relative residual {result.residual:.3g}"
    else:
        what = f"direction error bound {result.direction_error:.3g}"
    message = (
        f"solver={name!r} stopped at {what} > tol={options.tol:g} after {result.iterations} "
        f"{solver.iteration_unit}"
    )
    if options.on_nonconvergence == "raise":
        raise NotConvergedError(
            message + "; raise max_epochs/max_iters, raise damping, loosen tol, or use "
            "solver='cholesky'"
        )
    if options.on_nonconvergence == "warn":
        warnings.warn(message, NotConvergedWarning, stacklevel=_user_stacklevel())
        return result, name, [message]
    try:
        exact = SOLVER_REGISTRY["cholesky"].solve(operator, rhs, options, generator)
    except GramMemoryError as error:  # say why the exact solve was needed at all
        raise GramMemoryError(
            f"{message}, and the exact solve that on_nonconvergence='fallback' then runs "
            f"does not fit: {error}; or let solver={name!r} reach tol (raise "
            "max_epochs/max_iters, raise damping, loosen tol)"
        ) from error
    exact = replace(exact, iterations=result.iterations)
    return exact, "cholesky", [message + "; solved exactly with cholesky instead"]
