"""Tests for the gaps that mutation testing found in natgrad/rl/ (mutation_report.md).

Each test names the surviving mutants it kills; all of them run in about a second.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from natgrad.rl.critic import CriticTrainer


def _regression(n: int = 64):
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(n, 3, generator=gen)
    returns = obs @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return obs, returns


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        nn.init.zeros_(self.layer.weight)
        nn.init.zeros_(self.layer.bias)

    def forward(self, obs):
        return self.layer(obs).squeeze(-1)


def test_critic_fit_reports_the_error_before_and_then_fits():
    # fit returns mean((V - R)^2) before fitting (V = 0 here: mean(R^2)); kills critic.py:36
    # (- -> +); the regression then fits (kills :40 minibatch loop removed, :42 - -> *)
    obs, returns = _regression()
    critic = _Linear()
    trainer = CriticTrainer(critic, lr=0.05, epochs=200, minibatch=16, seed=0)
    before = trainer.fit(obs, returns)
    assert before == pytest.approx(float((returns**2).mean()), rel=1e-6)
    with torch.no_grad():
        after = float(((critic(obs) - returns) ** 2).mean())
    assert after < 1e-3 * before


def test_critic_takes_one_step_per_minibatch_per_epoch():
    obs, returns = _regression(n=50)
    trainer = CriticTrainer(_Linear(), lr=1e-3, epochs=3, minibatch=16, seed=0)
    steps = []
    original = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: steps.append(1) or original(*a, **k)
    trainer.fit(obs, returns)
    assert len(steps) == 3 * 4  # ceil(50 / 16) minibatches in each of 3 epochs
