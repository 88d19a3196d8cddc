"""The linear-operator interface the solvers see: ``J`` through a few products.

``J`` is an ``N x P`` matrix (one row per sample: a policy score, a Fisher row). Solvers
only ever see a :class:`ScoreOperator` -- block rows ``J_S`` (a :class:`ScoreBlock`),
products ``J v`` and ``J^T x``, the Gram matrix ``K = J J^T`` -- and, for the
``torch.compile`` path, :class:`BlockFunctions` of a typed payload. This module knows
nothing of ``nn`` or ``torch.func``: policy scores (:mod:`natgrad.scores`) and factored
layers (:mod:`natgrad.factored`, :mod:`natgrad.layers`) are built on top of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from natgrad.errors import ArgumentError

__all__ = [
    "DENSE_FUNCTIONS",
    "BlockFunctions",
    "DenseBlock",
    "DenseOperator",
    "DensePayload",
    "Payload",
    "ScoreBlock",
    "ScoreOperator",
    "bytes_for_matrix",
    "working_dtype",
]

Payload = Any
"""A ``NamedTuple`` of tensors (and ints) that pure :class:`BlockFunctions` read."""


class ScoreBlock(ABC):
    """The rows ``J_S`` of one block of samples, seen through three products."""

    dtype: torch.dtype

    @abstractmethod
    def gram(self) -> Tensor:
        """``J_S J_S^T`` (shape ``(b, b)``)."""

    @abstractmethod
    def matvec(self, v: Tensor) -> Tensor:
        """``J_S v`` for ``v`` of shape ``(P,)``; returns shape ``(b,)``."""

    @abstractmethod
    def rmatvec(self, x: Tensor) -> Tensor:
        """``J_S^T x`` for ``x`` of shape ``(b,)``; returns shape ``(P,)``."""

    def functional(self) -> tuple[BlockFunctions, Payload] | None:
        """Pure functions and their tensor payload for the compiled path, or ``None``."""
        return None


@dataclass(frozen=True)
class BlockFunctions:
    """Pure functions of a payload giving ``J J^T``, ``J v``, ``J^T x``.

    Rows exposed this way can run on the ``torch.compile`` path (``compile=True``). The
    payload is a ``NamedTuple`` whose first leaf tensor has the rows' dtype.
    """

    gram: Callable[[Payload], Tensor]
    matvec: Callable[[Payload, Tensor], Tensor]
    rmatvec: Callable[[Payload, Tensor], Tensor]


class DensePayload(NamedTuple):
    """Payload of explicit rows: ``rows`` of shape ``(b, P)``."""

    rows: Tensor


def _dense_gram(payload: DensePayload) -> Tensor:
    return payload.rows @ payload.rows.T


def _dense_matvec(payload: DensePayload, v: Tensor) -> Tensor:
    return payload.rows @ v


def _dense_rmatvec(payload: DensePayload, x: Tensor) -> Tensor:
    return payload.rows.T @ x


DENSE_FUNCTIONS = BlockFunctions(_dense_gram, _dense_matvec, _dense_rmatvec)


class DenseBlock(ScoreBlock):
    """A block held as an explicit ``(b, P)`` matrix of rows."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows
        self.dtype = rows.dtype

    def gram(self) -> Tensor:
        return self.rows @ self.rows.T

    def matvec(self, v: Tensor) -> Tensor:
        return self.rows @ v

    def rmatvec(self, x: Tensor) -> Tensor:
        return self.rows.T @ x

    def functional(self) -> tuple[BlockFunctions, DensePayload]:
        return DENSE_FUNCTIONS, DensePayload(self.rows)


class ScoreOperator(ABC):
    """The score matrix ``J`` (``N x P``) seen through the few products solvers need."""

    num_samples: int
    num_params: int
    dtype: torch.dtype
    device: torch.device
    backend: str

    @abstractmethod
    def block(self, index: Tensor) -> ScoreBlock:
        """The rows ``J_S`` of the samples in ``index``."""

    @abstractmethod
    def matvec(self, v: Tensor) -> Tensor:
        """``J v`` for ``v`` of shape ``(P,)``; returns shape ``(N,)``."""

    @abstractmethod
    def rmatvec(self, x: Tensor) -> Tensor:
        """``J^T x`` for ``x`` of shape ``(N,)``; returns shape ``(P,)``."""

    @abstractmethod
    def gram(self) -> Tensor:
        """The kernel ``K = J J^T`` (shape ``(N, N)``)."""

    def functional(self) -> tuple[BlockFunctions, Payload] | None:
        """Pure functions and payload of the whole ``J`` for the compiled path, or ``None``."""
        return None

    def cross_gram(self, index: Tensor) -> Tensor:
        """Columns ``K[:, index] = J J[index]^T`` of the kernel (shape ``(N, len(index))``).

        Used by the Nystrom preconditioner of CG; every built-in backend implements it.
        """
        raise NotImplementedError(f"{type(self).__name__} has no cross_gram")

    def squared_norms(self) -> Tensor:
        """Squared row norms ``|psi_i|^2``, the diagonal of ``K`` (shape ``(N,)``).

        The default forms ``K``; backends override it with something cheaper.
        """
        return self.gram().diagonal()

    def kernel_trace(self) -> float | None:
        """``trace(K)``: the sum of :meth:`squared_norms`, or ``None`` when unknown.

        ``None`` suits an operator whose rows cost far more than its products; the
        conditioning estimate then relies on power iterations alone.
        """
        return float(self.squared_norms().to(torch.float64).sum())

    @property
    def score_dtype(self) -> torch.dtype:
        """The dtype the scores were computed in (rounding level of ``J``).

        Equals :attr:`dtype` except for half-precision policies, whose scores are stored
        and multiplied in float32 (see :func:`working_dtype`).
        """
        return self.__dict__.get("_score_dtype", self.dtype)

    @score_dtype.setter
    def score_dtype(self, dtype: torch.dtype) -> None:
        self.__dict__["_score_dtype"] = dtype


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype that score rows are stored and multiplied in: at least float32.

    Gram matrices and products of float16/bfloat16 rows would round every sum to 3 or 2
    significant digits; accumulating in float32 keeps only the scores' own rounding.
    """
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


class DenseOperator(ScoreOperator):
    """``J`` held in memory as an ``(N, P)`` tensor.

    Parameters
    ----------
    matrix
        The matrix, one row per sample.
    """

    backend = "materialized"

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2:
            raise ArgumentError(f"matrix must be 2-D (N, P), got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.num_samples, self.num_params = matrix.shape
        self.dtype = matrix.dtype
        self.device = matrix.device

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``J[index]`` (shape ``(len(index), P)``)."""
        return self.matrix[index]

    def block(self, index: Tensor) -> ScoreBlock:
        return DenseBlock(self.matrix[index])

    def matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def rmatvec(self, x: Tensor) -> Tensor:
        return self.matrix.T @ x

    def gram(self) -> Tensor:
        return self.matrix @ self.matrix.T

    def functional(self) -> tuple[BlockFunctions, DensePayload]:
        return DENSE_FUNCTIONS, DensePayload(self.matrix)

    def cross_gram(self, index: Tensor) -> Tensor:
        return self.matrix @ self.matrix[index].T

    def squared_norms(self) -> Tensor:
        return torch.linalg.vector_norm(self.matrix, dim=1).to(torch.float64) ** 2


def bytes_for_matrix(num_samples: int, num_params: int, dtype: torch.dtype) -> int:
    """Bytes needed to hold an ``N x P`` score matrix of ``dtype``."""
    return num_samples * num_params * torch.finfo(dtype).bits // 8
