"""Independent dense float64 reference: per-sample gradients one at a time, P x P solve."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def take_sample(tree, i: int):
    if isinstance(tree, Tensor):
        return tree[i : i + 1]
    if isinstance(tree, dict):
        return {k: take_sample(v, i) for k, v in tree.items()}
    return type(tree)(take_sample(v, i) for v in tree)


def dense_scores(policy: nn.Module, log_prob_fn, obs, acts, params: list[Tensor], n: int) -> Tensor:
    """J (N x P): row i is the autograd gradient of sample i's log-probability alone."""
    rows = []
    for i in range(n):
        log_prob = log_prob_fn(policy, take_sample(obs, i), take_sample(acts, i))
        grads = torch.autograd.grad(log_prob.sum(), params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows).to(torch.float64)


def dense_natural_gradient(scores: Tensor, adv: Tensor, damping: float) -> Tensor:
    """d = (F + lam I)^{-1} g with F = J^T J / N, g = J^T A / N, solved in parameter space."""
    n, p = scores.shape
    fisher = scores.T @ scores / n
    fisher += damping * torch.eye(p, dtype=torch.float64)
    return torch.linalg.solve(fisher, scores.T @ adv.to(torch.float64) / n)


def reference_log_prob(policy: nn.Module, obs, acts) -> Tensor:
    """log pi(a|s) for a batch, summing any per-dimension log-probabilities."""
    log_prob = policy(obs).log_prob(acts)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1)
