"""The ``torch.compile`` path: the per-block Kaczmarz step and the kernel product fused.

A score operator or block that can be written as pure functions of a few tensors (its
*payload*) exposes them through ``functional()``; the whole per-block step (``J_S v``,
the residual, the small Cholesky solve, ``v += J_S^T delta / N``) then runs as one
compiled graph instead of a dozen eager kernel launches and Python round trips. The
eager functions are the reference: the compiled ones compute the same expressions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import Tensor

from natgrad.scores import BlockFunctions

Payload = Any  # a tuple (tree) of tensors and ints


def _block_step(
    fns: BlockFunctions,
    payload: Payload,
    x_block: Tensor,
    v: Tensor,
    rhs_block: Tensor,
    factor: Tensor,
    damping: float,
    inv_n: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = factor.dtype
    jv = fns.matvec(payload, v.to(_payload_dtype(payload))).to(dtype)
    residual = rhs_block - jv - damping * x_block
    delta = torch.cholesky_solve(residual.unsqueeze(1), factor).squeeze(1)
    dv = fns.rmatvec(payload, delta.to(_payload_dtype(payload))).to(dtype)
    return x_block + delta, v + dv * inv_n, residual


def _block_factor(fns: BlockFunctions, payload: Payload, damping: float, inv_n: float) -> Tensor:
    matrix = fns.gram(payload).to(torch.float64) * inv_n
    matrix = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.cholesky(matrix)


def _kernel(
    fns: BlockFunctions, payload: Payload, x: Tensor, inv_n: float
) -> tuple[Tensor, Tensor]:
    dtype = _payload_dtype(payload)
    v = fns.rmatvec(payload, x.to(dtype)).to(torch.float64) * inv_n
    return v, fns.matvec(payload, v.to(dtype)).to(torch.float64)


def _matvec(fns: BlockFunctions, payload: Payload, v: Tensor) -> Tensor:
    return fns.matvec(payload, v.to(_payload_dtype(payload))).to(torch.float64)


def _payload_dtype(payload: Payload) -> torch.dtype:
    first = payload[0]
    while isinstance(first, tuple):
        first = first[0]
    return first.dtype


@cache
def _compiled(name: str) -> Callable[..., Any]:
    functions = {"step": _block_step, "factor": _block_factor, "kernel": _kernel, "matvec": _matvec}
    function = functions[name]
    return torch.compile(function)


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
    return _compiled("step")(fns, payload, x_block, v, rhs_block, factor, damping, inv_n)


def fused_block_factor(
    fns: BlockFunctions, payload: Payload, damping: float, inv_n: float
) -> Tensor:
    """Compiled Cholesky factor of ``J_S J_S^T / N + lam I`` (float64)."""
    return _compiled("factor")(fns, payload, damping, inv_n)


def fused_kernel(
    fns: BlockFunctions, payload: Payload, x: Tensor, inv_n: float
) -> tuple[Tensor, Tensor]:
    """Compiled ``(v, J v)`` with ``v = J^T x / N`` (float64), the CG matrix product."""
    return _compiled("kernel")(fns, payload, x, inv_n)


def fused_matvec(fns: BlockFunctions, payload: Payload, v: Tensor) -> Tensor:
    """Compiled ``J v`` in float64 for a float64 ``v``."""
    return _compiled("matvec")(fns, payload, v)
