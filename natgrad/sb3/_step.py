"""Writing a step along the natural gradient into an SB3 policy's parameters."""

from __future__ import annotations

import torch as th
from torch import Tensor, nn

from natgrad import NaturalGradient

__all__ = ["ParameterStep"]


class ParameterStep:
    """``theta_0 + scale * d`` for the parameters of one natural gradient, undoable.

    Parameters
    ----------
    policy
        The policy whose parameters ``ng.param_names`` name.
    ng
        The natural gradient; its ``direction`` is the step per unit ``scale``.
    """

    def __init__(self, policy: nn.Module, ng: NaturalGradient) -> None:
        named = dict(policy.named_parameters())
        self.params: list[Tensor] = [named[name] for name in ng.param_names]
        self.origin = [p.detach().clone() for p in self.params]
        self.direction = ng.direction

    @th.no_grad()
    def apply(self, scale: float) -> None:
        """Set the parameters to ``theta_0 + scale * d``."""
        for param, origin, step in zip(self.params, self.origin, self.direction, strict=True):
            param.copy_(origin + scale * step.to(param.dtype))

    def undo(self) -> None:
        """Restore ``theta_0`` exactly."""
        with th.no_grad():
            for param, origin in zip(self.params, self.origin, strict=True):
                param.copy_(origin)
