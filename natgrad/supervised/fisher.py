"""The supervised Fisher written as score rows: ``F = W^T W / N`` and ``g`` beside it.

Each likelihood and Fisher type becomes a matrix ``W`` (``R x P``, ``R`` rows for ``N``
samples) with ``F = W^T W / N``, plus the gradient ``g`` of the mean loss. When ``g`` lies in
the row space of ``W`` we also return coefficients ``u`` with ``g = W^T u / N``; the
natural gradient then has the kernel (Woodbury) form ``d = W^T (W W^T / N + lam I)^{-1} u / N``.
Otherwise (sampled Fisher) the push-through form of ``docs/derivation.md`` is needed.

=============  ==========  ==========================================  ======================
loss           fisher      rows of ``W`` for sample ``i``               ``u`` (kernel form)
=============  ==========  ==========================================  ======================
mse            exact       ``J_i`` (``k`` rows; Gauss-Newton)           residuals ``f_i - y_i``
mse            sampled     ``J_i^T eps_i``, ``eps_i ~ N(0, I_k)``       none (push-through)
cross_entropy  exact       ``sqrt(p_ic) (J_ic - p_i^T J_i)``, each c    ``-1/sqrt(p_iy)`` at y
cross_entropy  sampled     ``J_i^T (e_y~ - p_i)``, ``y~ ~ p_i``         none (push-through)
=============  ==========  ==========================================  ======================

For cross-entropy, ``L_i`` with columns ``sqrt(p_c) (e_c - p)`` is a square root of
``diag p - p p^T`` (``sum_c p_c (e_c - p)(e_c - p)^T = diag p - p p^T`` since
``sum_c p_c = 1``), and ``L_i u_i = p_i - e_y`` for ``u_i = -e_y / sqrt(p_y)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from natgrad._checks import check_choice
from natgrad.errors import ArgumentError, ArgumentTypeError
from natgrad.fisher.factors import categorical_rows

LossName = Literal["mse", "cross_entropy"]
FisherName = Literal["exact", "sampled"]
LOSSES: tuple[str, ...] = ("mse", "cross_entropy")
FISHERS: tuple[str, ...] = ("exact", "sampled")

__all__ = [
    "FISHERS",
    "LOSSES",
    "FisherName",
    "FisherRows",
    "LossName",
    "exact_fisher_quadratic",
    "fisher_rows",
    "mean_loss",
]


@dataclass(frozen=True)
class FisherRows:
    """``W`` with ``F = W^T W / N``, the mean-loss gradient ``g`` and, if any, ``u``.

    Attributes
    ----------
    rows
        ``W``, shape ``(R, P)`` in the parameters' dtype.
    gradient
        ``g``, gradient of the mean loss, float64, shape ``(P,)``.
    coefficients
        ``u`` (float64, shape ``(R,)``) with ``g = W^T u / N``, or ``None`` when ``g`` is not
        in the row space (sampled Fisher) or ``u`` overflowed (a probability underflowed).
    loss
        The mean loss on the batch.
    sampled_targets
        Targets drawn from the model for ``fisher="sampled"`` (class indices ``(N,)`` or
        Gaussian targets ``(N, k)``), ``None`` for ``fisher="exact"``.
    num_samples
        ``N``.
    """

    rows: Tensor
    gradient: Tensor
    coefficients: Tensor | None
    loss: float
    sampled_targets: Tensor | None
    num_samples: int


def mean_loss(outputs: Tensor, targets: Tensor, loss: LossName) -> Tensor:
    """Mean over samples of ``0.5 |f - y|^2`` (mse) or ``-log softmax(f)_y`` (cross_entropy).

    ``outputs`` is ``(N, ...)`` with ``targets`` of the same shape for mse (summed over all
    but the first dimension), logits ``(N, C)`` with class indices ``(N,)`` for
    cross_entropy: the loss whose natural gradient
    :func:`~natgrad.supervised.natural_gradient` computes. Differentiable, so it also
    serves as the training loss.

    Raises
    ------
    ArgumentError
        An unknown ``loss``, or shapes that do not match (they are never broadcast).
    ArgumentTypeError
        Targets of the wrong kind (class indices for mse, floats for cross_entropy).
    """
    check_choice("loss", loss, LOSSES)
    _check_loss_shapes(outputs, targets, loss)
    if loss == "mse":
        residual = (outputs - targets).reshape(outputs.shape[0], -1)
        return 0.5 * residual.pow(2).sum(dim=1).mean()
    return torch.nn.functional.cross_entropy(outputs, targets)


def _check_loss_shapes(outputs: Tensor, targets: Tensor, loss: LossName) -> None:
    """Refuse what :func:`mean_loss` would broadcast or read as another loss."""
    for name, value in (("outputs", outputs), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise ArgumentTypeError(
                f"{name} must be a torch.Tensor, got {type(value).__name__}; convert it "
                "with torch.as_tensor(...)"
            )
    if loss == "mse":
        if outputs.dim() == 0 or targets.shape != outputs.shape:
            raise ArgumentError(
                f"loss='mse' needs outputs of shape (N, ...) and targets of the same shape, "
                f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} "
                "(they are not broadcast); reshape the targets with "
                "targets.reshape(outputs.shape)"
            )
        if not targets.is_floating_point():
            raise ArgumentTypeError(
                f"loss='mse' needs floating-point targets, got {targets.dtype}; for class "
                "labels use loss='cross_entropy'"
            )
        return
    if outputs.dim() != 2 or targets.shape != outputs.shape[:1]:
        raise ArgumentError(
            "loss='cross_entropy' needs logits of shape (N, C) and class indices of shape "
            f"(N,), got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ArgumentTypeError(
            f"loss='cross_entropy' needs integer class indices, got dtype {targets.dtype}; "
            "for one-hot targets pass targets.argmax(1)"
        )


def fisher_rows(
    outputs: Tensor,
    jacobians: Tensor,
    targets: Tensor,
    loss: LossName,
    fisher: FisherName,
    generator: torch.Generator,
) -> FisherRows:
    """Build ``W``, ``g`` and ``u`` for one batch (see the module table).

    Parameters
    ----------
    outputs
        ``f(x_i)``, shape ``(N, k)`` (logits for cross-entropy).
    jacobians
        ``J_i``, shape ``(N, k, P)``.
    targets
        ``(N, k)`` regression targets or ``(N,)`` class indices.
    loss, fisher
        Which likelihood and which Fisher.
    generator
        Source of the sampled targets (CPU generator; samples are moved to the device).
    """
    n = outputs.shape[0]
    dtype = jacobians.dtype
    jac64 = jacobians.to(torch.float64)
    out64 = outputs.to(torch.float64)
    sampled: Tensor | None = None
    if loss == "mse":
        residual = out64 - targets.to(torch.float64)
        value = 0.5 * float(residual.pow(2).sum(dim=1).mean())
        gradient = torch.einsum("nkp,nk->p", jac64, residual) / n
        if fisher == "exact":
            rows = jacobians.reshape(-1, jacobians.shape[2])
            return FisherRows(rows, gradient, residual.reshape(-1), value, None, n)
        noise = torch.randn(out64.shape, generator=generator, dtype=torch.float64)
        noise = noise.to(outputs.device)
        sampled = (out64 + noise).to(outputs.dtype)
        rows = torch.einsum("nkp,nk->np", jacobians, noise.to(dtype))
        return FisherRows(rows, gradient, None, value, sampled, n)

    log_p = torch.log_softmax(out64, dim=1)
    p = log_p.exp()
    labels = targets.long()
    value = -float(log_p.gather(1, labels[:, None]).mean())
    onehot = torch.nn.functional.one_hot(labels, outputs.shape[1]).to(torch.float64)
    gradient = torch.einsum("ncp,nc->p", jac64, p - onehot) / n
    if fisher == "exact":
        rows = categorical_rows(log_p, jacobians).reshape(-1, jacobians.shape[2])
        coefficients = torch.zeros_like(p)
        # exp(-log p / 2) rather than 1 / sqrt(p): finite for far smaller p_y.
        coefficients.scatter_(1, labels[:, None], -(-0.5 * log_p.gather(1, labels[:, None])).exp())
        coefficients = coefficients.reshape(-1)
        if not bool(torch.isfinite(coefficients).all()):
            coefficients = None
        return FisherRows(rows, gradient, coefficients, value, None, n)
    sampled = torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(outputs.device)
    centered = torch.nn.functional.one_hot(sampled, outputs.shape[1]).to(torch.float64) - p
    rows = torch.einsum("ncp,nc->np", jacobians, centered.to(dtype))
    return FisherRows(rows, gradient, None, value, sampled, n)


def exact_fisher_quadratic(outputs: Tensor, jt: Tensor, loss: LossName) -> float:
    """``t^T F t`` for the exact Fisher, from the outputs and ``J t`` (both ``(N, k)``).

    ``mean_i |J_i t|^2`` for mse; ``mean_i (sum_c p_ic (J_i t)_c^2 - (p_i^T J_i t)^2)`` for
    cross-entropy.
    """
    jt = jt.to(torch.float64)
    if loss == "mse":
        return float(jt.pow(2).sum(dim=1).mean())
    p = torch.softmax(outputs.to(torch.float64), dim=1)
    return float(((p * jt.pow(2)).sum(dim=1) - (p * jt).sum(dim=1).pow(2)).mean())
