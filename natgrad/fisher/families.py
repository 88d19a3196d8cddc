"""Action distributions with a closed-form expected Fisher, and how to build its rows.

A family reads the parameters ``z`` of a batch of distributions (``outputs``: one row of
``k`` numbers per sample, a function the per-sample Jacobian ``dz / dtheta`` is taken of)
and turns those Jacobians into Fisher rows with :mod:`natgrad.fisher.factors` (``rows``).
The expected Fisher of a sample, ``E_{a ~ pi(.|s)}[psi psi^T]``, is the Gram of its rows.

Supported: ``Categorical`` (any batch shape beyond the sample: multi-discrete heads of one
size are independent categoricals), ``Normal`` (state-independent or state-dependent
scale) and ``Independent`` wrapping either. Actions that factorize over dimensions have a
block-diagonal Fisher, so the rows of all dimensions are stacked. A new family needs one
:class:`FisherFamily` and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, Independent, Normal

from natgrad.errors import FisherError
from natgrad.fisher.factors import categorical_rows, gaussian_rows

__all__ = ["FAMILIES", "FisherFamily", "family_of", "unwrap"]


@dataclass(frozen=True)
class FisherFamily:
    """How one distribution type exposes its parameters and its Fisher square root.

    Attributes
    ----------
    outputs
        ``outputs(dist) -> Tensor (n, k)``: the distribution parameters ``z`` of each of
        the ``n`` samples, differentiable in ``theta`` (``dist`` may be ``Independent``).
    rows
        ``rows(dist, jacobians) -> Tensor (N, m, P)``: Fisher rows of each sample from the
        batched (detached) distribution and the Jacobians ``dz / dtheta`` ``(N, k, P)``.
    """

    outputs: Callable[[Distribution], Tensor]
    rows: Callable[[Distribution, Tensor], Tensor]


def _flat(values: Tensor) -> Tensor:
    return values.reshape(values.shape[0], -1)


def _categorical_outputs(dist: Distribution) -> Tensor:
    return _flat(unwrap(dist).logits)


def _categorical_rows(dist: Distribution, jacobians: Tensor) -> Tensor:
    dist = unwrap(dist)
    n, _, p = jacobians.shape
    classes = dist.logits.shape[-1]
    log_p = torch.log_softmax(dist.logits.detach().to(torch.float64), dim=-1).reshape(
        n, -1, classes
    )
    rows = categorical_rows(log_p, jacobians.reshape(n, -1, classes, p))
    return rows.reshape(n, -1, p)


def _normal_outputs(dist: Distribution) -> Tensor:
    dist = unwrap(dist)
    return torch.cat([_flat(dist.loc), _flat(dist.scale.log())], dim=1)


def _normal_rows(dist: Distribution, jacobians: Tensor) -> Tensor:
    dist = unwrap(dist)
    n, k, p = jacobians.shape
    scale = _flat(dist.scale.detach().to(torch.float64))
    pair = jacobians.reshape(n, 2, k // 2, p)
    return gaussian_rows(scale, pair[:, 0], pair[:, 1])


FAMILIES: dict[type[Distribution], FisherFamily] = {
    Categorical: FisherFamily(_categorical_outputs, _categorical_rows),
    Normal: FisherFamily(_normal_outputs, _normal_rows),
}
"""Distribution types with a closed-form expected Fisher (``Independent`` is unwrapped)."""


def unwrap(dist: Distribution) -> Distribution:
    """The base distribution under any ``Independent`` wrappers (same Fisher, summed)."""
    while isinstance(dist, Independent):
        dist = dist.base_dist
    return dist


def supported() -> str:
    """The supported distribution types, for messages."""
    return ", ".join(kind.__name__ for kind in FAMILIES) + " (or Independent of them)"


def family_of(dist: object) -> FisherFamily:
    """The :class:`FisherFamily` of ``dist`` (after unwrapping ``Independent``).

    Raises
    ------
    FisherError
        If ``dist`` is not a distribution or its type has no closed-form expected Fisher.
    """
    if not isinstance(dist, Distribution):
        raise FisherError(
            f"fisher='expected' reads the action distribution from policy(obs), which must "
            f"return a torch.distributions.Distribution, got {type(dist).__name__}; make "
            f"forward return one of {supported()}, or use fisher='sampled'"
        )
    base = unwrap(dist)
    for kind in type(base).__mro__:
        if kind in FAMILIES:
            return FAMILIES[kind]
    raise FisherError(
        f"fisher='expected' has a closed form only for {supported()}, and policy(obs) "
        f"returned {type(base).__name__}; use fisher='sampled' (the scores of the taken "
        "actions), or register its Fisher in natgrad.fisher.families.FAMILIES"
    )
