"""The ``torch.compile`` path: the per-block Kaczmarz step and the kernel product fused.

A score operator or block that can be written as pure functions of a few tensors (its
*payload*) exposes them through ``functional()``; the whole per-block step (``J_S v``,
the residual, the small Cholesky solve, ``v += J_S^T delta / N``) then runs as one
compiled graph instead of a dozen eager kernel launches and Python round trips. The
eager functions are the reference: the compiled ones compute the same expressions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from natgrad.operators import BlockFunctions, Payload

F = TypeVar("F", bound=Callable[..., Any])


def _compiled_on_first_call(function: F) -> F:
    """``torch.compile(function)``, built when first called (importing stays cheap)."""
    compiled: list[Callable[..., Any]] = []

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(function))
        return compiled[0](*args)

    return call  # type: ignore[return-value]


def _payload_dtype(payload: Payload) -> torch.dtype:
    """Dtype of the rows: that of the payload's first leaf tensor (payloads are NamedTuples)."""
    first = payload[0]
    while isinstance(first, tuple):
        first = first[0]
    return first.dtype


@_compiled_on_first_call
def fused_block_step(
    fns: BlockFunctions,
    payload: Payload,
    x_block: Tensor,
    v: Tensor,
    rhs_block: Tensor,
    factor: Tensor,
    damping: float,
    inv_n: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Compiled block projection; returns new ``x_S``, new ``v`` and the residual ``r_S``."""
    dtype = factor.dtype
    jv = fns.matvec(payload, v.to(_payload_dtype(payload))).to(dtype)
    residual = rhs_block - jv - damping * x_block
    delta = torch.cholesky_solve(residual.unsqueeze(1), factor).squeeze(1)
    dv = fns.rmatvec(payload, delta.to(_payload_dtype(payload))).to(dtype)
    return x_block + delta, v + dv * inv_n, residual


@_compiled_on_first_call
def fused_block_factor(
    fns: BlockFunctions, payload: Payload, damping: float, inv_n: float
) -> Tensor:
    """Compiled Cholesky factor of ``J_S J_S^T / N + lam I`` (float64)."""
    matrix = fns.gram(payload).to(torch.float64) * inv_n
    matrix = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.cholesky(matrix)


@_compiled_on_first_call
def fused_kernel(
    fns: BlockFunctions, payload: Payload, x: Tensor, inv_n: float
) -> tuple[Tensor, Tensor]:
    """Compiled ``(v, J v)`` with ``v = J^T x / N`` (float64), the CG matrix product."""
    dtype = _payload_dtype(payload)
    v = fns.rmatvec(payload, x.to(dtype)).to(torch.float64) * inv_n
    return v, fns.matvec(payload, v.to(dtype)).to(torch.float64)


@_compiled_on_first_call
def fused_matvec(fns: BlockFunctions, payload: Payload, v: Tensor) -> Tensor:
    """Compiled ``J v`` in float64 for a float64 ``v``."""
    return fns.matvec(payload, v.to(_payload_dtype(payload))).to(torch.float64)
