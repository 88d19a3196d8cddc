"""Square roots of output-space Fisher matrices, applied to output Jacobians.

A distribution with parameters ``z`` (``k`` numbers per sample) has a Fisher ``G(z)`` in
``z``; the Fisher in ``theta`` of one sample is ``J_z^T G J_z`` with ``J_z = dz / dtheta``
(``k x P``). Writing ``G = L L^T`` gives ``m`` rows ``L^T J_z`` with
``J_z^T G J_z = (L^T J_z)^T (L^T J_z)``, the form the RAT solvers take.

* Categorical with probabilities ``p`` (``z`` the logits): ``G = diag p - p p^T`` and the
  columns ``sqrt(p_c) (e_c - p)`` of ``L`` give the rows ``sqrt(p_c) (J_c - p^T J_z)``, one
  per class ``c`` (``sum_c p_c (e_c - p)(e_c - p)^T = diag p - p p^T`` since
  ``sum_c p_c = 1``). Row ``c`` is also ``sqrt(p_c) psi(a = c)``.
* Normal with mean ``mu`` and scale ``sigma`` (``z = (mu, log sigma)`` per action
  dimension): ``G = diag(1 / sigma^2, 2)``, so the rows ``J_mu / sigma`` and
  ``sqrt(2) J_log_sigma``, two per action dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["categorical_rows", "gaussian_rows"]


def categorical_rows(log_p: Tensor, jacobians: Tensor) -> Tensor:
    """Rows ``sqrt(p_c) (J_c - p^T J)`` whose Gram is ``J^T (diag p - p p^T) J``.

    Parameters
    ----------
    log_p
        Log-probabilities (normalized), shape ``(..., C)``; float64 keeps ``sqrt(p)`` exact
        for tiny probabilities (``exp(log p / 2)``, not ``sqrt(exp(log p))``).
    jacobians
        Jacobians of the logits, shape ``(..., C, P)``.

    Returns
    -------
    Tensor
        Shape ``(..., C, P)`` in the dtype of ``jacobians``.
    """
    dtype = jacobians.dtype
    mean_row = torch.einsum("...c,...cp->...p", log_p.exp().to(dtype), jacobians)
    sqrt_p = (0.5 * log_p).exp().to(dtype)
    return sqrt_p[..., None] * (jacobians - mean_row[..., None, :])


def gaussian_rows(scale: Tensor, loc_jacobians: Tensor, log_scale_jacobians: Tensor) -> Tensor:
    """Rows ``J_mu / sigma`` and ``sqrt(2) J_log_sigma`` of independent Normal dimensions.

    Parameters
    ----------
    scale
        ``sigma``, shape ``(..., D)``.
    loc_jacobians, log_scale_jacobians
        Jacobians of ``mu`` and of ``log sigma``, shape ``(..., D, P)`` each.

    Returns
    -------
    Tensor
        Shape ``(..., 2 D, P)`` in the dtype of the Jacobians: the ``D`` mean rows, then
        the ``D`` scale rows.
    """
    dtype = loc_jacobians.dtype
    mean_rows = loc_jacobians / scale.to(dtype)[..., None]
    return torch.cat([mean_rows, math.sqrt(2.0) * log_scale_jacobians], dim=-2)
