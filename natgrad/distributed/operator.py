"""The score matrix of the union of all ranks' samples, each rank holding its own rows.

Rank ``k`` holds ``J_k`` (``n_k x P``), the scores of its own samples; the global
``J = [J_0; J_1; ...]`` (``N x P``, ``N = sum n_k``) is never assembled. Vectors over the
samples (``x``, ``A``, ``J v``) are split the same way: each rank holds its rows. Vectors
over the parameters (``v = J^T x / N``) are replicated: every rank holds the same one.

* ``J^T x = sum_k J_k^T x_k``: one all-reduce of a ``P``-vector;
* ``J v``: local (each rank multiplies its own rows by the replicated ``v``);
* so the kernel product ``K x / N = J (J^T x) / N`` costs exactly one all-reduce of
  ``P`` floats (plus, optionally, a few local scalars summed in the same call);
* dot products of sample vectors are local partial sums, all-reduced.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.distributed.comm import Communicator
from natgrad.operators import DenseBlock, DenseOperator, ScoreOperator
from natgrad.solvers._products import operator_matvec, operator_rmatvec

__all__ = ["ShardedOperator", "local_rows"]


class ShardedOperator:
    """``J`` of all ranks, seen from one rank: its local operator and the collectives.

    Parameters
    ----------
    local
        This rank's score operator ``J_k`` (any backend).
    comm
        The communicator of the process group.
    sizes
        Every rank's number of samples ``n_k``, in rank order (the same list on every rank).
    backends
        Every rank's score backend, in rank order (the same list on every rank; each rank
        picks its own, e.g. ``backend="auto"`` by its own ``n_k``). ``None``: every rank
        uses this rank's.
    """

    def __init__(
        self,
        local: ScoreOperator,
        comm: Communicator,
        sizes: list[int],
        backends: list[str] | None = None,
    ) -> None:
        self.local = local
        self.comm = comm
        self.sizes = list(sizes)
        self.num_samples = sum(sizes)
        self.num_local = local.num_samples
        self.offset = sum(sizes[: comm.rank])
        self.num_params = local.num_params
        self.dtype = local.dtype
        self.score_dtype = local.score_dtype
        self.device = local.device
        self.backend = local.backend
        self.backends = list(backends) if backends is not None else [local.backend] * len(sizes)

    def direction(self, x: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``v = J^T x / N`` (replicated) from the local rows ``x``; one all-reduce.

        ``extra``: local float64 scalars summed over ranks in the same all-reduce (returned
        as the second value; empty when ``None``).
        """
        parts = [operator_rmatvec(self.local, x)]
        if extra is not None:
            parts.append(extra.to(parts[0].device))
        reduced = self.comm.all_reduce(torch.cat(parts))
        p = self.num_params
        return reduced[:p] / self.num_samples, reduced[p:]

    def kernel(self, x: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(v, J_k v, sums)`` with ``v = J^T x / N``: the kernel product ``K x / N`` by rows."""
        v, sums = self.direction(x, extra)
        return v, operator_matvec(self.local, v), sums

    def dot(self, a: Tensor, b: Tensor) -> float:
        """Global dot product of two row-split sample vectors."""
        return self.comm.sum(a @ b)[0]

    def norm(self, a: Tensor) -> float:
        """Global Euclidean norm of a row-split sample vector."""
        return max(self.dot(a, a), 0.0) ** 0.5


def local_rows(operator: ScoreOperator, index: Tensor) -> Tensor:
    """Dense score rows ``J_k[index]`` of this rank, as a ``(len(index), P)`` tensor.

    Uses the backend's own dense rows when it has them (materialized, factored, streaming),
    else ``len(index)`` products ``J_k^T e_i``.
    """
    if isinstance(operator, DenseOperator):
        return operator.rows(index)
    dense_rows = getattr(operator, "dense_rows", None)
    if callable(dense_rows):
        return dense_rows(index)
    block = operator.block(index)
    if isinstance(block, DenseBlock):
        return block.rows
    eye = torch.eye(len(index), dtype=operator.dtype, device=operator.device)
    return torch.stack([block.rmatvec(e) for e in eye])
