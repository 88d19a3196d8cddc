"""Reference problems of issue 5: policies, batches, exact directions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, Normal


class GaussianMLP(nn.Module):
    """Hopper-sized policy: 17 -> 64 -> 64 -> 6, tanh, state-independent log-std."""

    def __init__(self, obs_dim: int = 17, act_dim: int = 6, hidden: int = 64, depth: int = 2):
        super().__init__()
        layers, width = [], obs_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        self.mean = nn.Sequential(*layers, nn.Linear(width, act_dim))
        self.log_std = nn.Parameter(torch.full((act_dim,), -0.5))

    def forward(self, obs: Tensor):
        return Independent(Normal(self.mean(obs), self.log_std.exp()), 1)


class MinAtarCNN(nn.Module):
    """MinAtar-sized policy: 4x10x10 -> Conv(16, 3x3) -> 128 -> 6 logits."""

    def __init__(self, channels: int = 4, actions: int = 6):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, 16, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, actions))

    def forward(self, obs: Tensor):
        return Categorical(logits=self.head(self.conv(obs)))


class TransformerPolicy(nn.Module):
    """2 encoder layers, d=64, 16 tokens of 8 features, 6 logits."""

    def __init__(self, features: int = 8, width: int = 64, actions: int = 6):
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, actions)

    def forward(self, obs: Tensor):
        return Categorical(logits=self.head(self.encoder(self.embed(obs)).mean(dim=1)))


@dataclass
class Problem:
    name: str
    policy: nn.Module
    obs: Tensor
    acts: Tensor
    adv: Tensor


def make_problem(
    name: str, seed: int = 0, device: str = "cpu", num_samples: int | None = None
) -> Problem:
    """Build a policy, an on-policy batch (actions sampled from it) and normalized advantages.

    The advantages are a noisy linear function of the scores' leading direction plus noise,
    so they are neither pure noise nor trivially aligned with the gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        policy, n = GaussianMLP(), 2048
        obs = torch.randn(n, 17, generator=gen)
    elif name == "cnn":
        policy, n = MinAtarCNN(), 1024
        obs = (torch.rand(n, 4, 10, 10, generator=gen) < 0.1).float()
    elif name == "transformer":
        policy, n = TransformerPolicy(), 512
        obs = torch.randn(n, 16, 8, generator=gen)
    elif name == "large_mlp":
        policy, n = GaussianMLP(obs_dim=64, act_dim=8, hidden=700, depth=2), 4096
        obs = torch.randn(n, 64, generator=gen)
    else:
        raise ValueError(f"unknown problem {name!r}")
    if num_samples is not None:  # same policy, another batch size (memory scaling)
        n = num_samples
        obs = torch.randn(n, *obs.shape[1:], generator=gen)
    with torch.no_grad():
        dist = policy(obs)
        acts = dist.sample()
        log_prob = dist.log_prob(acts)
    returns = log_prob + torch.randn(n, generator=gen) * log_prob.std()
    adv = (returns - returns.mean()) / returns.std()
    policy = policy.to(device)
    return Problem(name, policy, obs.to(device), acts.to(device), adv.to(device))


def log_prob_fn(policy: nn.Module, obs: Tensor, acts: Tensor) -> Tensor:
    """The policy's log-probability of the actions, one per sample."""
    return policy(obs).log_prob(acts)
