"""Exact distributed solve: assemble ``K = J J^T`` of all ranks, factor it on every rank.

The kernel couples every pair of samples, so its off-diagonal blocks ``J_k J_l^T`` need
one rank's rows next to another's. Each rank forms its diagonal block ``K_kk`` with its
backend's own Gram matrix; the rows travel chunk by chunk: rank ``l`` broadcasts ``c`` of
its rows at a time (``c = block_size``), every other rank ``k`` multiplies them by its own
rows into its rows of ``K`` and drops the chunk. Each rank then holds
only its ``n_k x N`` rows of ``K``; one all-reduce of ``N x (N + 1)`` floats gives every
rank the whole kernel and the whole right-hand side, and each rank factors
``K / N + lam I`` and solves (the same inputs, so the same answer). One last all-reduce of
``P`` floats forms ``d = J^T x / N`` from the local rows of ``x``.

Communication: one scalar all-reduced first (the memory check below), ``N P`` floats
broadcast (in ``sum_l ceil(n_l / c)`` calls), ``N (N + 1)`` all-reduced once, ``P``
all-reduced once. Memory: about ``3 N^2 + n_k N`` float64 on every rank (its rows of ``K``,
the all-reduced ``K`` and ``A``, the damped kernel and its factor); before allocating any of
it, every rank compares that with its free memory and one all-reduce of the worst ratio
makes every rank raise the same :class:`~natgrad.errors.GramMemoryError` if one of them
cannot hold it (no rank is left waiting in a collective). It is
meant for small ``N`` (a few thousand samples); CG and Kaczmarz exchange ``P``-vectors
only. The score rows of other ranks are seen one chunk at a time, never kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.distributed.operator import ShardedOperator, local_rows
from natgrad.errors import GramMemoryError
from natgrad.solvers._base import SolveResult, cholesky_factor, relative_residual
from natgrad.solvers.memory import _size, available_bytes

__all__ = ["distributed_cholesky", "distributed_gram_bytes"]


def distributed_gram_bytes(num_samples: int, num_local: int) -> int:
    """Peak bytes of :func:`distributed_cholesky` on a rank holding ``num_local`` samples."""
    total = num_samples
    return 8 * (num_local * total + total * (total + 1) + 2 * total * total)


def check_distributed_gram_fits(operator: ShardedOperator) -> None:
    """Raise :class:`~natgrad.errors.GramMemoryError` on every rank if any rank lacks memory.

    One all-reduce of a scalar: the largest shortfall (needed minus free bytes) over the
    ranks; a rank that cannot tell its free memory counts as having enough.
    """
    needed = distributed_gram_bytes(operator.num_samples, operator.num_local)
    free = available_bytes(operator.device)
    shortfall = operator.comm.max(float(needed - free) if free is not None else -1.0)
    if shortfall <= 0:
        return
    raise GramMemoryError(
        f"the distributed exact solve (solver='cholesky', also the fallback of "
        f"on_nonconvergence='fallback' when an iterative solver misses tol) holds the whole "
        f"N x N kernel and its factor on every rank: N={operator.num_samples} needs "
        f"~{_size(needed)} per rank, {_size(int(shortfall))} more than a rank "
        f"has free; use solver='cg' or 'kaczmarz' (they exchange P-vectors only) with "
        f"on_nonconvergence='raise' or 'warn', or pass fewer samples per call"
    )


def distributed_cholesky(
    operator: ShardedOperator, rhs: Tensor, damping: float, chunk_size: int
) -> SolveResult:
    """Solve ``(K / N + lam I) x = rhs`` exactly for the union of all ranks' samples.

    Parameters
    ----------
    operator
        The sharded score operator.
    rhs
        This rank's rows of the right-hand side (float64).
    damping
        ``lam > 0``.
    chunk_size
        Rows per broadcast.

    Raises
    ------
    GramMemoryError
        On every rank alike, before anything is allocated, if one rank cannot hold the
        kernel and its factor.
    IllConditionedError
        On every rank alike, if ``K / N + lam I`` is not numerically positive definite.
    """
    check_distributed_gram_fits(operator)
    comm, total, n = operator.comm, operator.num_samples, operator.num_local
    device = rhs.device
    mine = slice(operator.offset, operator.offset + n)
    kernel_rows = torch.empty(n, total, dtype=torch.float64, device=device)
    kernel_rows[:, mine] = operator.local.gram().to(torch.float64)  # the backend's own K_kk
    if comm.size == 1:
        rows = torch.empty(0, operator.num_params, device=device)  # nothing to send
    else:
        rows = local_rows(operator.local, torch.arange(n, device=operator.device))
    start = 0
    for source, size in enumerate(operator.sizes):
        for first in range(0, size if comm.size > 1 else 0, chunk_size):
            count = min(chunk_size, size - first)
            if comm.rank == source:
                chunk = rows[first : first + count].contiguous()
            else:
                chunk = torch.empty(count, operator.num_params, dtype=rows.dtype, device=device)
            comm.broadcast(chunk, source)
            if comm.rank != source:
                columns = slice(start + first, start + first + count)
                kernel_rows[:, columns] = (rows @ chunk.T).to(torch.float64)
        start += size
    assembled = torch.zeros(total, total + 1, dtype=torch.float64, device=device)
    assembled[mine, :total] = kernel_rows
    assembled[mine, total] = rhs
    comm.all_reduce(assembled)
    kernel = assembled[:, :total] / total
    rhs_all = assembled[:, total].clone()
    kernel.diagonal().add_(damping)
    factor = cholesky_factor(kernel, damping, operator.score_dtype)
    x_all = torch.cholesky_solve(rhs_all.unsqueeze(1), factor).squeeze(1)
    jv_all = (kernel @ x_all) - damping * x_all
    residual = relative_residual(rhs_all, jv_all, x_all, damping)
    x, jv = x_all[mine].clone(), jv_all[mine].clone()
    comm.phase = "check"
    v, _ = operator.direction(x)
    comm.stats.iterations = 1
    return SolveResult(x=x, v=v, jv=jv, residual=residual, iterations=1, converged=True)
