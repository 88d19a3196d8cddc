"""The factored linear-layer backend: products equal dense ones; unsafe layers are refused."""

from __future__ import annotations

import pytest
import torch
from cases import GaussianMLP
from reference import dense_natural_gradient, dense_scores, reference_log_prob
from torch import nn
from torch.distributions import Categorical

from natgrad import RATNaturalGradient
from natgrad.factored import FactoredScores, build_factored_scores
from natgrad.scores import PolicyScores, default_log_prob

N = 20


def policy_scores(policy, obs, acts, log_prob_fn=default_log_prob):
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    with torch.no_grad():
        log_probs = log_prob_fn(policy, obs, acts)
    return PolicyScores(policy, log_prob_fn, obs, acts, names, log_probs)


def gaussian_batch():
    torch.manual_seed(0)
    policy = GaussianMLP().double()
    return policy, torch.randn(N, 5, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64)


def test_factored_products_match_dense_rows():
    policy, obs, acts = gaussian_batch()
    scores = policy_scores(policy, obs, acts)
    operator, reason = build_factored_scores(scores, policy, default_log_prob, obs, acts, 64)
    assert isinstance(operator, FactoredScores), reason
    assert operator.rest is not None  # log_std is not a linear layer
    dense = scores.rows(torch.arange(N))
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(scores.num_params, generator=gen, dtype=torch.float64)
    x = torch.randn(N, generator=gen, dtype=torch.float64)
    assert torch.allclose(operator.matvec(v), dense @ v, atol=1e-12)
    assert torch.allclose(operator.rmatvec(x), dense.T @ x, atol=1e-12)
    assert torch.allclose(operator.gram(), dense @ dense.T, atol=1e-12)
    index = torch.tensor([3, 7, 11])
    block = operator.block(index)
    assert torch.allclose(block.gram(), dense[index] @ dense[index].T, atol=1e-12)
    assert torch.allclose(block.matvec(v), dense[index] @ v, atol=1e-12)
    assert torch.allclose(block.rmatvec(x[index]), dense[index].T @ x[index], atol=1e-12)


class TiedHead(nn.Module):
    """The head's weight is also used outside the head's forward: not factorable."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, obs):
        h = torch.tanh(self.body(obs))
        extra = nn.functional.linear(h, self.head.weight)[:, :1] ** 2  # moves one logit only
        return Categorical(logits=self.head(h) + nn.functional.pad(extra, (0, 2)))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, obs):
        return Categorical(logits=self.out(torch.tanh(self.layer(torch.tanh(self.layer(obs))))))


@pytest.mark.parametrize("model", [TiedHead, CalledTwice])
def test_unsafe_layers_fall_back_and_stay_exact(model):
    torch.manual_seed(0)
    policy = model().double()
    obs = torch.randn(N, 4, dtype=torch.float64)
    acts = torch.randint(0, 3, (N,))
    adv = torch.randn(N, dtype=torch.float64)
    params = list(policy.parameters())
    expected = dense_natural_gradient(
        dense_scores(policy, reference_log_prob, obs, acts, params, N), adv, 1e-2
    )
    rat = RATNaturalGradient(damping=1e-2, solver="cholesky", backend="factored")
    direction = torch.cat(
        [d.reshape(-1) for d in rat.natural_gradient(policy, obs, acts, adv).direction]
    )
    assert torch.linalg.vector_norm(direction - expected) <= 1e-9 * torch.linalg.vector_norm(
        expected
    )
    if model is TiedHead:  # the probe catches the hidden reuse; generic scores are used
        assert rat.diagnostics.backend == "materialized"
        assert "disagree" in rat.diagnostics.fallbacks[0]
    else:  # the twice-called layer goes to the generic part, the rest stays factored
        assert rat.diagnostics.backend == "factored"


def test_no_linear_layer_notes_the_fallback():
    class ConvOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.ConvTranspose2d(1, 3, 3)  # no registered layer kind

        def forward(self, obs):
            return Categorical(logits=self.conv(obs).mean(dim=(2, 3)))

    policy = ConvOnly()
    obs, acts, adv = torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,)), torch.randn(6)
    rat = RATNaturalGradient(backend="factored")
    rat(policy, obs, acts, adv)
    assert rat.diagnostics.backend == "materialized"
    assert "backend='factored' unavailable" in rat.diagnostics.fallbacks[0]
