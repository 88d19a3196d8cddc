"""Generalized advantage estimation, GAE(lambda)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_gae"]


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    dones: Tensor,
    last_value: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Advantages and value targets by GAE(lambda) (Schulman et al., 2016).

    Parameters
    ----------
    rewards, values, dones
        Shape ``(T, E)``: reward of step ``t``, ``V(s_t)``, and whether the episode ended
        after step ``t`` (terminated or truncated; truncated episodes must already have
        ``gamma * V(final_obs)`` folded into their last reward).
    last_value
        ``V(s_T)`` of the observation after the rollout, shape ``(E,)``.
    gamma, lam
        Discount and GAE parameter.

    Returns
    -------
    tuple of Tensor
        ``(advantages, returns)``, both ``(T, E)``, with ``returns = advantages + values``.
    """
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(steps)):
        not_done = 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values
