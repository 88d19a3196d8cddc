"""``vpg`` / ``a2c``: the vanilla policy gradient, one Adam step per batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from natgrad.rl.algorithms.base import PolicyUpdate
from natgrad.rl.config import TrainConfig
from natgrad.rl.policies import entropy, log_prob

__all__ = ["VanillaPG"]


class VanillaPG(PolicyUpdate):
    """One Adam step on ``-(mean(A log pi) + ent_coef * entropy)`` per batch.

    ``a2c`` is the same update (advantage actor-critic with a GAE baseline and a separate
    critic); the two names exist because users look for both.
    """

    name = "vpg"

    def __init__(self, policy: nn.Module, config: TrainConfig, seed: int) -> None:
        super().__init__(policy, config, seed)
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, eps=1e-5)

    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """One clipped Adam step along the vanilla gradient."""
        dist = self.policy(obs)
        loss = -(log_prob(dist, acts) * adv).mean() - self.config.ent_coef * entropy(dist).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        return {"policy_loss": loss.item(), "grad_norm": norm.item()}

    def state_dict(self) -> dict[str, Any]:
        """Adam moments."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore Adam moments."""
        self.optimizer.load_state_dict(state["optimizer"])
