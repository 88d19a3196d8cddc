"""``ppo``: clipped surrogate, several epochs of minibatch Adam (reference baseline)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.distributions import entropy, log_prob
from natgrad.rl.algorithms.base import PolicyUpdate
from natgrad.rl.algorithms.vanilla import VanillaPGOptions
from natgrad.rl.options import option, positive

__all__ = ["PPO", "PPOOptions"]


@dataclasses.dataclass
class PPOOptions(VanillaPGOptions):
    """Options of ``ppo``: those of ``vpg`` plus the epochs, minibatch and clip."""

    ppo_epochs: int = option(10, "PPO optimization epochs per batch.", positive)
    ppo_minibatch: int = option(64, "PPO minibatch size.", positive)
    clip_range: float = option(0.2, "PPO ratio clip.", positive)


class PPO(PolicyUpdate):
    """Proximal policy optimization with the clipped objective (Schulman et al., 2017).

    Minibatches are drawn from a ``torch.Generator`` seeded by the run.
    """

    Options = PPOOptions
    options: PPOOptions

    def __init__(self, policy: nn.Module, options: Any = None, seed: int = 0) -> None:
        super().__init__(policy, options, seed)
        self.optimizer = torch.optim.Adam(self.params, lr=self.options.lr, eps=1e-5)
        self.generator = torch.Generator().manual_seed(seed)

    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch Adam on the clipped surrogate."""
        opts = self.options
        n = adv.shape[0]
        clip_fraction = []
        for _ in range(opts.ppo_epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, opts.ppo_minibatch):
                idx = order[start : start + opts.ppo_minibatch]
                dist = self.policy(obs[idx])
                ratio = torch.exp(log_prob(dist, acts[idx]) - old_log_probs[idx])
                clipped = ratio.clamp(1.0 - opts.clip_range, 1.0 + opts.clip_range)
                loss = -torch.min(ratio * adv[idx], clipped * adv[idx]).mean()
                loss = loss - opts.ent_coef * entropy(dist).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.params, opts.max_grad_norm)
                self.optimizer.step()
                clip_fraction.append(((ratio - 1.0).abs() > opts.clip_range).float().mean())
        return {"clip_fraction": torch.stack(clip_fraction).mean().item()}

    def state_dict(self) -> dict[str, Any]:
        """Adam moments and the minibatch generator."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore Adam moments and the minibatch generator."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
