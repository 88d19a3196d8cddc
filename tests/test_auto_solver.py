"""solver="auto": Cholesky on a GPU for small N with a cheap Gram matrix, else CG."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from natgrad import RATNaturalGradient
from natgrad.solvers.dispatch import AUTO_CHOLESKY_MAX_SAMPLES, resolve_solver


def fake_operator(device: str, backend: str, num_samples: int) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device), backend=backend, num_samples=num_samples)


@pytest.mark.parametrize(
    ("device", "backend", "num_samples", "expected"),
    [
        ("cuda", "factored", 2048, "cholesky"),
        ("cuda", "materialized", AUTO_CHOLESKY_MAX_SAMPLES, "cholesky"),
        ("cuda", "materialized", AUTO_CHOLESKY_MAX_SAMPLES + 1, "cg"),
        ("cuda", "streaming", 512, "cg"),  # the Gram matrix would recompute every row
        ("cpu", "factored", 512, "cg"),
        ("cpu", "materialized", 64, "cg"),
    ],
)
def test_auto_choice(device, backend, num_samples, expected):
    assert resolve_solver("auto", fake_operator(device, backend, num_samples)) == expected


@pytest.mark.parametrize("explicit", ["cg", "kaczmarz", "cholesky"])
def test_explicit_choice_is_kept(explicit):
    assert resolve_solver(explicit, fake_operator("cuda", "factored", 16)) == explicit


def test_default_on_cpu_runs_cg():
    torch.manual_seed(0)
    policy = nn.Linear(3, 4)

    def log_prob_fn(p, obs, acts):
        return torch.distributions.Categorical(logits=p(obs)).log_prob(acts)

    rat = RATNaturalGradient(log_prob_fn)
    assert rat.solver == "auto"
    rat(policy, torch.randn(32, 3), torch.randint(0, 4, (32,)), torch.randn(32))
    assert rat.diagnostics.solver == "cg"
