"""A declarative table of policies (architecture x distribution x input type) for tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import (
    Beta,
    Categorical,
    Independent,
    Normal,
    TanhTransform,
    TransformedDistribution,
)


@dataclass
class Case:
    name: str
    make_policy: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple[Any, Any]]
    log_prob_fn: Callable | None = None
    params: Callable[[nn.Module], list[Tensor]] | None = None


class GaussianMLP(nn.Module):
    def __init__(self, state_dependent_std: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.mean = nn.Linear(12, 3)
        self.state_dependent_std = state_dependent_std
        if state_dependent_std:
            self.log_std = nn.Linear(12, 3)
        else:
            self.log_std = nn.Parameter(torch.full((3,), -0.3))

    def forward(self, obs):
        h = self.body(obs)
        log_std = self.log_std(h) if self.state_dependent_std else self.log_std
        return Normal(self.mean(h), log_std.exp().expand(h.shape[0], 3))


class TanhGaussian(GaussianMLP):
    def forward(self, obs):
        base = super().forward(obs)
        return TransformedDistribution(Independent(base, 1), [TanhTransform(cache_size=1)])


class BetaMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, obs):
        out = nn.functional.softplus(self.net(obs)) + 1.0
        return Independent(Beta(out[:, :2], out[:, 2:]), 1)


class CategoricalCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, obs):
        return Categorical(logits=self.head(self.conv(obs)))


class BatchNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 4))

    def forward(self, obs):
        return Categorical(logits=self.net(obs))


def batchnorm_eval() -> nn.Module:
    policy = BatchNormMLP()
    with torch.no_grad():  # non-trivial running statistics
        policy.net[1].running_mean.uniform_(-1, 1)
        policy.net[1].running_var.uniform_(0.5, 2)
    return policy.eval()


class RecurrentPolicy(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.rnn = cell(3, 6, batch_first=True)
        self.head = nn.Linear(6, 4)

    def forward(self, obs):
        out, _ = self.rnn(obs)
        return Categorical(logits=self.head(out[:, -1]))


class AttentionPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.mean = nn.Linear(8, 2)
        self.log_std = nn.Parameter(torch.zeros(2))

    def forward(self, obs):
        h = self.encoder(self.embed(obs)).mean(dim=1)
        return Independent(Normal(self.mean(h), self.log_std.exp()), 1)


class MultiDiscrete(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 3 + 4))

    def forward(self, obs):
        return self.net(obs)


def multi_discrete_log_prob(policy, obs, acts):
    logits = policy(obs)
    first = Categorical(logits=logits[:, :3]).log_prob(acts[:, 0])
    second = Categorical(logits=logits[:, 3:]).log_prob(acts[:, 1])
    return first + second


class DictObsPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten())
        self.vec = nn.Linear(3, 4)
        self.head = nn.Linear(2 * 3 * 3 + 4, 3)

    def forward(self, obs):
        features = torch.cat([self.conv(obs["image"]), self.vec(obs["vector"])], dim=1)
        return Categorical(logits=self.head(features))


class ActorCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 10), nn.Tanh())
        self.actor = nn.Linear(10, 3)
        self.critic = nn.Linear(10, 1)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)

    def forward(self, obs):
        return Categorical(logits=self.actor(self.trunk(obs + self.frozen(obs))))


def vector_batch(n, gen, dim=5):
    return torch.randn(n, dim, generator=gen)


def continuous(k):
    return lambda n, gen: (vector_batch(n, gen), torch.randn(n, k, generator=gen))


def discrete(k, obs_fn=vector_batch):
    return lambda n, gen: (obs_fn(n, gen), torch.randint(0, k, (n,), generator=gen))


def squashed(n, gen):
    return vector_batch(n, gen), torch.rand(n, 3, generator=gen) * 1.6 - 0.8


def unit_interval(n, gen):
    return vector_batch(n, gen), torch.rand(n, 2, generator=gen) * 0.9 + 0.05


def sequences(n, gen):
    return torch.randn(n, 4, 3, generator=gen)


def images(n, gen):
    return torch.randn(n, 2, 6, 6, generator=gen)


def multi_discrete(n, gen):
    acts = torch.stack(
        [torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 4, (n,), generator=gen)], dim=1
    )
    return vector_batch(n, gen), acts


def dict_obs(n, gen):
    obs = {
        "image": torch.randn(n, 1, 5, 5, generator=gen),
        "vector": torch.randn(n, 3, generator=gen),
    }
    return obs, torch.randint(0, 3, (n,), generator=gen)


CASES = [
    Case("gaussian_mlp", GaussianMLP, continuous(3)),
    Case("gaussian_state_std", lambda: GaussianMLP(True), continuous(3)),
    Case("tanh_gaussian", TanhGaussian, squashed),
    Case("beta_layernorm", BetaMLP, unit_interval),
    Case("categorical_cnn", CategoricalCNN, discrete(5, images)),
    Case("batchnorm_eval", batchnorm_eval, discrete(4)),
    Case("gru", lambda: RecurrentPolicy(nn.GRU), discrete(4, sequences)),
    Case("lstm", lambda: RecurrentPolicy(nn.LSTM), discrete(4, sequences)),
    Case(
        "transformer",
        AttentionPolicy,
        lambda n, g: (sequences(n, g), torch.randn(n, 2, generator=g)),
    ),
    Case("multi_discrete", MultiDiscrete, multi_discrete, log_prob_fn=multi_discrete_log_prob),
    Case("dict_obs", DictObsPolicy, dict_obs),
    Case(
        "shared_trunk_subset",
        ActorCritic,
        discrete(3),
        params=lambda p: [*p.trunk.parameters(), *p.actor.parameters()],
    ),
]


def build(case: Case, n: int, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    policy = case.make_policy().to(dtype)
    gen = torch.Generator().manual_seed(seed)
    obs, acts = case.make_batch(n, gen)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    obs = {k: cast(v) for k, v in obs.items()} if isinstance(obs, dict) else cast(obs)
    acts = cast(acts)
    adv = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    return policy, obs, acts, adv
