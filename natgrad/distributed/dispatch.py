"""The distributed counterpart of :func:`natgrad.solvers.solve`.

Same contract and policies as the single-process dispatch (right-hand side scaled to
``max |rhs| = 1``, conditioning checked against the scores' precision, ``on_nonconvergence``
applied), with every quantity a decision depends on all-reduced first, so all ranks take
the same branch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
from torch import Tensor

from natgrad.distributed.cg import block_jacobi_preconditioner, distributed_cg
from natgrad.distributed.cholesky import distributed_cholesky
from natgrad.distributed.kaczmarz import distributed_kaczmarz
from natgrad.distributed.operator import ShardedOperator
from natgrad.errors import NotConvergedError, NotConvergedWarning, ProcessGroupError
from natgrad.solvers._base import SolveResult
from natgrad.solvers.conditioning import (
    _POWER_SEED,
    POWER_ITERATIONS,
    Conditioning,
    _conditioning,
)
from natgrad.solvers.dispatch import (
    _precision_notes,
    _user_stacklevel,
    auto_solver,
    vanishing_kernel_note,
)
from natgrad.solvers.options import SolverOptions

__all__ = ["DISTRIBUTED_SOLVERS", "distributed_conditioning", "solve_distributed"]

DISTRIBUTED_SOLVERS: tuple[str, ...] = ("cg", "cholesky", "kaczmarz")
"""The ``solver=`` values with a distributed form (``"auto"`` resolves to one of them)."""

_ITERATION_UNIT = {"cg": "iterations", "kaczmarz": "epochs", "cholesky": "iterations"}


def resolve_distributed_solver(
    solver: str, operator: ShardedOperator, preconditioner_rank: int = 0
) -> str:
    """``"auto"``: the single-process rule (:func:`~natgrad.solvers.dispatch.auto_solver`).

    The rule reads only what every rank shares: the total ``N``, the device type and every
    rank's backend (a rank whose backend recomputes rows counts for all), so every rank
    resolves ``"auto"`` to the same solver even when their backends differ.

    Raises
    ------
    ProcessGroupError
        For a solver without a distributed form (e.g. one registered by the user).
    """
    if solver == "auto":
        return auto_solver(
            operator.device, shared_backend(operator.backends), operator.num_samples,
            preconditioner_rank,
        )  # fmt: skip
    if solver not in DISTRIBUTED_SOLVERS:
        raise ProcessGroupError(
            f"solver={solver!r} has no distributed form; with a process_group use one of "
            f"{', '.join(repr(s) for s in ('auto', *DISTRIBUTED_SOLVERS))}"
        )
    return solver


def shared_backend(backends: list[str]) -> str:
    """The backend ``"auto"`` is resolved for: the first that is not cheap, else the first.

    ``auto_solver`` picks Cholesky only for backends with a cheap Gram matrix (factored,
    materialized); one rank streaming its rows makes the exact solve slow for every rank.
    """
    cheap = ("factored", "materialized")
    return next((backend for backend in backends if backend not in cheap), backends[0])


def rank_generator(generator: torch.Generator, rank: int) -> torch.Generator:
    """A generator for this call and rank, from one draw of the shared ``generator``.

    Every rank draws the same number from ``generator`` (so seeded generators stay in step
    across ranks and calls) and offsets it by its rank (so blocks are drawn independently).
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator().manual_seed((seed + 0x9E3779B97F4A7C15 * rank) % 2**63)


def local_squared_norms(operator: ShardedOperator) -> float:
    """``sum_i |psi_i|^2`` over every rank's samples, raising on every rank if one fails.

    It is the first pass over the score rows: a streaming backend computes them here for
    the first time, so a rank whose scores are not finite (or whose policy couples its
    samples) finds out here, alone. Its failure rides in the same all-reduce as the sum,
    so that rank raises its own error and every other rank a
    :class:`~natgrad.errors.ProcessGroupError` instead of waiting in its next collective.

    Returns
    -------
    float
        The global sum ``trace(K)``.
    """
    failure: BaseException | None = None
    try:
        squares = operator.local.squared_norms().to(torch.float64).sum()
    except Exception as error:  # noqa: BLE001 - re-raised below, after telling the others
        failure, squares = error, torch.zeros((), dtype=torch.float64)
    total, failed = operator.comm.sum(squares, 0.0 if failure is None else 1.0)
    if failure is not None:
        raise failure
    if failed > 0:
        raise ProcessGroupError(
            f"{int(failed)} other rank(s) of the process group failed computing their score "
            "rows (gradients of log pi) before the solve; fix the input or the policy on those "
            "ranks (their own errors say what is wrong)"
        )
    return total


def distributed_conditioning(operator: ShardedOperator, damping: float, tol: float) -> Conditioning:
    """:func:`~natgrad.solvers.conditioning.estimate_conditioning` for all ranks' samples.

    ``trace(K / N)`` is one all-reduce of 2 floats (the trace and any rank's failure to
    compute its scores, see :func:`local_squared_norms`); the power iterations (only when the
    trace cannot show ``precision <= tol``) start from the single-process start vector's
    rows and cost one all-reduce of ``P`` floats and one of a scalar each.
    """
    eps_work = torch.finfo(operator.dtype).eps
    eps_score = torch.finfo(operator.score_dtype).eps
    total = operator.num_samples
    trace = local_squared_norms(operator) / total
    if not math.isfinite(trace):
        return Conditioning(math.inf, math.inf, math.inf, math.inf)
    if trace == 0.0:  # every rank's scores are zero: M = lam I exactly
        return replace(_conditioning(0.0, damping, eps_work, eps_score), kernel_vanishes=True)
    largest = trace
    if _conditioning(trace, damping, eps_work, eps_score).precision > tol and total > 1:
        generator = torch.Generator().manual_seed(_POWER_SEED)
        start = torch.randn(total, generator=generator, dtype=torch.float64)
        mine = slice(operator.offset, operator.offset + operator.num_local)
        x = start[mine].to(operator.device)
        norm = operator.norm(x)
        estimate = 0.0
        for _ in range(POWER_ITERATIONS):
            x = x / norm
            v, kx, _ = operator.kernel(x)
            estimate = total * float(v @ v)  # x^T K x / N
            norm = operator.norm(kx)
            if not math.isfinite(estimate) or norm == 0.0:
                break
            x = kx
        if math.isfinite(estimate):
            largest = min(max(estimate, 0.0), trace)
    return _conditioning(largest, damping, eps_work, eps_score)


def _solve_vanishing_kernel(operator: ShardedOperator, rhs: Tensor, damping: float) -> SolveResult:
    """``x = rhs / lam``, exact when every score is zero (see the single-process dispatch)."""
    x = rhs / damping
    v, jv, _ = operator.kernel(x)
    residual = operator.norm(rhs - jv - damping * x) / operator.norm(rhs)
    return SolveResult(x, v, jv, residual, 0, True, 0.0)


def _run_solver(
    name: str,
    operator: ShardedOperator,
    rhs: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
) -> SolveResult:
    if name == "cholesky":
        return distributed_cholesky(operator, rhs, options.damping, options.block_size)
    if name == "kaczmarz":
        return distributed_kaczmarz(
            operator,
            rhs,
            options.damping,
            options.block_size,
            options.max_epochs,
            options.tol,
            generator,
            options.resample_blocks,
        )
    preconditioner = block_jacobi_preconditioner(
        operator, options.damping, options.preconditioner_rank, generator
    )
    return distributed_cg(
        operator, rhs, options.damping, options.tol, options.max_iters, preconditioner
    )


def solve_distributed(
    operator: ShardedOperator,
    rhs: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
) -> tuple[SolveResult, str, list[str]]:
    """Solve ``(K / N + lam I) x = A`` for the union of all ranks' samples.

    Parameters
    ----------
    operator
        The sharded score operator.
    rhs
        This rank's rows of ``A`` (float64).
    options
        The solver options (the same on every rank).
    generator
        The shared generator; one number is drawn from it per call on every rank.

    Returns
    -------
    result, solver_used, notes
        As :func:`natgrad.solvers.solve`; ``result.x`` and ``result.jv`` are this rank's
        rows, ``result.v`` (the direction) is the same on every rank.
    """
    comm = operator.comm
    name = resolve_distributed_solver(options.solver, operator, options.preconditioner_rank)
    local_generator = rank_generator(generator, comm.rank)
    comm.phase = "setup"
    scale = comm.max(float(rhs.abs().max()))
    if scale == 0.0:
        zero = torch.zeros_like(rhs)
        v = torch.zeros(operator.num_params, dtype=torch.float64, device=rhs.device)
        return SolveResult(zero, v, zero, 0.0, 0, True, 0.0, 1.0, 0.0), name, []
    comm.phase = "conditioning"
    conditioning = distributed_conditioning(operator, options.damping, options.tol)
    notes = _precision_notes(operator, conditioning, options)  # type: ignore[arg-type]
    comm.phase = "solve"
    unit_rhs = rhs / scale
    if conditioning.kernel_vanishes and name != "cholesky":  # the same branch on every rank
        result = _solve_vanishing_kernel(operator, unit_rhs, options.damping)
        notes.append(vanishing_kernel_note(name))
    else:
        result = _run_solver(name, operator, unit_rhs, options, local_generator)
    if not result.converged and name != "cholesky":
        what = (
            f"relative residual {result.residual:.3g}"
            if result.residual > options.tol
            else f"direction error bound {result.direction_error:.3g}"
        )
        message = (
            f"solver={name!r} stopped at {what} > tol={options.tol:g} after "
            f"{result.iterations} {_ITERATION_UNIT[name]} (distributed)"
        )
        if options.on_nonconvergence == "raise":
            raise NotConvergedError(
                message + "; raise max_epochs/max_iters, raise damping, loosen tol, or use "
                "solver='cholesky'"
            )
        if options.on_nonconvergence == "warn":
            warnings.warn(message, NotConvergedWarning, stacklevel=_user_stacklevel())
            notes.append(message)
        else:
            comm.phase = "solve"
            exact = distributed_cholesky(operator, unit_rhs, options.damping, options.block_size)
            result = replace(exact, iterations=result.iterations)
            notes.append(message + "; solved exactly with cholesky instead")
            name = "cholesky"
    if options.compile:
        notes.append("compile=True: the distributed solvers run eagerly")
    result = replace(
        result.scaled(scale),
        condition=conditioning.condition,
        precision=conditioning.precision,
        compiled=False,
    )
    return result, name, notes
