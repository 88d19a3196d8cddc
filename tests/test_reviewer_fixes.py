"""Reviewer fixes: warnings point at the user's line, whatever the entry point."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Categorical

from natgrad import NotConvergedWarning, PrecisionWarning, RATNaturalGradient


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, obs: torch.Tensor) -> Categorical:
        return Categorical(logits=self.net(obs))


def float32_batch(n: int = 64) -> tuple[Policy, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return Policy(), torch.randn(n, 4), torch.randint(0, 3, (n,)), torch.randn(n)


def test_precision_warning_points_at_the_callers_line() -> None:
    # tol=1e-9 is below what float32 scores can deliver: a PrecisionWarning on every path
    policy, obs, acts, adv = float32_batch()
    rat = RATNaturalGradient(damping=0.1, tol=1e-9, solver="cholesky")
    with pytest.warns(PrecisionWarning) as caught:
        rat(policy, obs, acts, adv)
    assert caught[0].filename == __file__
    with pytest.warns(PrecisionWarning) as caught:
        rat.__call__(policy, obs, acts, adv)
    assert caught[0].filename == __file__
    with pytest.warns(PrecisionWarning) as caught:
        rat.natural_gradient(policy, obs, acts, adv)
    assert caught[0].filename == __file__
    expected = RATNaturalGradient(damping=0.1, tol=1e-9, solver="cholesky", fisher="expected")
    with pytest.warns(PrecisionWarning) as caught:
        expected.natural_gradient(policy, obs, acts, adv)
    assert caught[0].filename == __file__


def test_not_converged_warning_points_at_the_callers_line() -> None:
    policy, obs, acts, adv = float32_batch()
    rat = RATNaturalGradient(
        damping=1e-2, tol=1e-5, solver="cg", max_iters=1, on_nonconvergence="warn"
    )
    expected = RATNaturalGradient(
        damping=1e-2, tol=1e-5, solver="cg", max_iters=1, on_nonconvergence="warn",
        fisher="expected",
    )  # fmt: skip
    for call in (rat, rat.natural_gradient, expected.natural_gradient):
        with pytest.warns(NotConvergedWarning) as caught:
            call(policy, obs, acts, adv)
        assert [w.filename for w in caught if w.category is NotConvergedWarning] == [__file__]
