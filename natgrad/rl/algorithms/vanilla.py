"""``vpg`` / ``a2c``: the vanilla policy gradient, one Adam step per batch."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.distributions import entropy, log_prob
from natgrad.rl.algorithms.base import PolicyUpdate
from natgrad.rl.options import AlgorithmOptions, nonnegative, option, positive

__all__ = ["VanillaPG", "VanillaPGOptions"]


@dataclasses.dataclass
class VanillaPGOptions(AlgorithmOptions):
    """Options of ``vpg`` / ``a2c`` (and, extended, of ``ppo``)."""

    lr: float = option(3e-4, "Adam learning rate of the policy.", positive)
    max_grad_norm: float = option(0.5, "Gradient-norm clip of each policy step.", positive)
    ent_coef: float = option(0.0, "Entropy bonus coefficient.", nonnegative)


class VanillaPG(PolicyUpdate):
    """One Adam step on ``-(mean(A log pi) + ent_coef * entropy)`` per batch.

    ``a2c`` is the same update (advantage actor-critic with a GAE baseline and a separate
    critic); the two names exist because users look for both.
    """

    Options = VanillaPGOptions
    options: VanillaPGOptions

    def __init__(self, policy: nn.Module, options: Any = None, seed: int = 0) -> None:
        super().__init__(policy, options, seed)
        self.optimizer = torch.optim.Adam(self.params, lr=self.options.lr, eps=1e-5)

    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """One clipped Adam step along the vanilla gradient."""
        opts = self.options
        dist = self.policy(obs)
        loss = -(log_prob(dist, acts) * adv).mean() - opts.ent_coef * entropy(dist).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.params, opts.max_grad_norm)
        self.optimizer.step()
        return {"policy_loss": loss.item(), "grad_norm": norm.item()}

    def state_dict(self) -> dict[str, Any]:
        """Adam moments."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore Adam moments."""
        self.optimizer.load_state_dict(state["optimizer"])
