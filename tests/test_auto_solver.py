"""solver="auto": Cholesky for small N with a cheap Gram matrix, else CG."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from natgrad import RATNaturalGradient
from natgrad.solvers.dispatch import (
    AUTO_CHOLESKY_CPU_RANKS,
    AUTO_CHOLESKY_MAX_SAMPLES,
    auto_solver,
    resolve_solver,
)


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
        ("cpu", "factored", 511, "cholesky"),
        ("cpu", "materialized", 64, "cholesky"),
        ("cpu", "streaming", 64, "cg"),
    ],
)
def test_auto_choice(device, backend, num_samples, expected):
    operator = fake_operator(device, backend, num_samples)
    assert resolve_solver("auto", operator, preconditioner_rank=256) == expected


@pytest.mark.parametrize("rank", [0, 1, 64, 256])
def test_cpu_solves_exactly_below_twice_the_preconditioner_rank(rank):
    limit = AUTO_CHOLESKY_CPU_RANKS * rank
    cpu = torch.device("cpu")
    for n in {1, max(limit - 1, 1), limit, limit + 1}:
        expected = "cholesky" if n < limit else "cg"
        assert auto_solver(cpu, "factored", n, rank) == expected, (n, rank)


@pytest.mark.parametrize("explicit", ["cg", "kaczmarz", "cholesky"])
def test_explicit_choice_is_kept(explicit):
    assert resolve_solver(explicit, fake_operator("cuda", "factored", 16)) == explicit


@pytest.mark.parametrize(("num_samples", "expected"), [(32, "cholesky"), (512, "cg")])
def test_default_on_cpu(num_samples, expected):
    torch.manual_seed(0)
    policy = nn.Linear(3, 4)

    def log_prob_fn(p, obs, acts):
        return torch.distributions.Categorical(logits=p(obs)).log_prob(acts)

    rat = RATNaturalGradient(log_prob_fn)
    assert rat.solver == "auto"
    n = num_samples
    rat(policy, torch.randn(n, 3), torch.randint(0, 4, (n,)), torch.randn(n))
    assert rat.diagnostics.solver == expected
