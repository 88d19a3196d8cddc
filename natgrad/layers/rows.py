"""Per-sample score rows of one layer, formed from its captured factors in one pass.

Some layers' scores are sums of outer products (a recurrent weight shared over ``T``
steps: ``sum_t g_t x_t^T``; a convolution kernel shared over positions). Summing them
once per sample gives the exact rows ``J_L`` (``(N, P_L)``) at the cost of one batched
matrix product, after which every product is a matmul; this beats keeping the ``T``
factors whenever the Gram matrix is needed (``T^2`` factor products per pair of samples).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RowsFactor"]


class RowsFactor(NamedTuple):
    """A layer's exact per-sample scores ``rows`` (``(N, P_L)``) and their ``positions``."""

    rows: Tensor
    positions: Tensor

    def take(self, index: Tensor) -> RowsFactor:
        return RowsFactor(self.rows[index], self.positions)

    def cross_gram(self, other: RowsFactor) -> Tensor:
        return self.rows @ other.rows.T

    def matvec(self, v: Tensor) -> Tensor:
        return self.rows @ v[self.positions]

    def rmatvec(self, x: Tensor) -> Tensor:
        return self.rows.T @ x

    def magnitude(self, x: Tensor) -> Tensor:
        return self.rows.abs().T @ x.abs()

    def squared_norms(self) -> Tensor:
        return torch.linalg.vector_norm(self.rows, dim=1).to(torch.float64) ** 2

    def dense_rows(self) -> Tensor:
        return self.rows
