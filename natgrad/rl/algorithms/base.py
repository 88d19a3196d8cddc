"""The one thing algorithms differ in: how the policy parameters are updated from a batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, kl_divergence

from natgrad.rl.config import TrainConfig

__all__ = ["PolicyUpdate", "mean_kl", "surrogate"]


def mean_kl(old: Distribution, new: Distribution) -> Tensor:
    """Mean over samples of ``KL(old || new)``, summed over action dimensions."""
    kl = kl_divergence(old, new)
    return (kl.reshape(kl.shape[0], -1).sum(-1) if kl.dim() > 1 else kl).mean()


def surrogate(log_probs: Tensor, old_log_probs: Tensor, adv: Tensor) -> Tensor:
    """Importance-weighted surrogate ``mean(pi / pi_old * A)``; its gradient at ``pi_old`` is g."""
    return (torch.exp(log_probs - old_log_probs) * adv).mean()


class PolicyUpdate(ABC):
    """Updates a policy in place from one on-policy batch.

    Everything else (rollouts, GAE, normalization, critic) is shared by the trainer, so
    algorithms are compared on their update direction and step only.

    Parameters
    ----------
    policy
        The policy to update; ``policy(obs)`` returns a ``torch.distributions`` object.
    config
        The run's hyperparameters.
    seed
        Seed of any randomness the update itself uses.
    """

    name: ClassVar[str]

    def __init__(self, policy: nn.Module, config: TrainConfig, seed: int) -> None:
        self.policy = policy
        self.config = config
        self.seed = seed

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters, in ``named_parameters`` order."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    @abstractmethod
    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """Update the policy; return scalar statistics to log.

        Parameters
        ----------
        obs, acts
            Batch of ``N`` observations and actions.
        old_log_probs
            ``log pi_old(a | s)`` at collection time, ``(N,)``.
        adv
            Normalized advantages, ``(N,)``.
        """

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (optimizer moments, RNG, curvature estimates)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore state saved by :meth:`state_dict`."""
