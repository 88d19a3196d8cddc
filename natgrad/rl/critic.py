"""The separate critic, fitted by regression onto GAE returns (shared by every algorithm)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CriticTrainer"]


class CriticTrainer:
    """Minibatch Adam on ``mean((V(s) - R)^2)``.

    Parameters
    ----------
    critic
        Module mapping observations to values ``(N,)``.
    lr, epochs, minibatch
        Adam learning rate, passes over the batch and minibatch size.
    seed
        Seed of the minibatch shuffling generator.

    Attributes
    ----------
    sync_grads
        Called with the critic's parameters between each backward pass and Adam step
        (``None``: nothing); a data-parallel run averages the gradients over ranks there.
    """

    def __init__(self, critic: nn.Module, lr: float, epochs: int, minibatch: int, seed: int):
        self.critic = critic
        self.epochs = epochs
        self.minibatch = minibatch
        self.optimizer = torch.optim.Adam(critic.parameters(), lr=lr, eps=1e-5)
        self.generator = torch.Generator().manual_seed(seed)
        self.sync_grads: Callable[[list[Tensor]], None] | None = None

    def fit(self, obs: Tensor, returns: Tensor) -> float:
        """Regress values onto ``returns``; return the mean squared error before fitting."""
        with torch.no_grad():
            before = float(((self.critic(obs) - returns) ** 2).mean())
        n = returns.shape[0]
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, self.minibatch):
                idx = order[start : start + self.minibatch]
                loss = ((self.critic(obs[idx]) - returns[idx]) ** 2).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.sync_grads is not None:
                    self.sync_grads(list(self.critic.parameters()))
                self.optimizer.step()
        return before

    def state_dict(self) -> dict[str, Any]:
        """Adam moments and the shuffling generator."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
