"""Convolutions: exact per-sample scores from unfolded inputs on the factored path.

Every factored score is compared with the per-sample reference (``tests/reference.py``:
each sample's gradient taken alone with autograd, float64) over strides, paddings
(numbers, ``"same"``, ``"valid"``, padding modes), dilations and groups.
"""

from __future__ import annotations

import pytest
import torch
from reference import dense_natural_gradient, dense_scores
from torch import Tensor, nn
from torch.distributions import Categorical

from natgrad import RATNaturalGradient
from natgrad.factored import build_factored_scores
from natgrad.layers.rows import RowsFactor
from natgrad.scores import PolicyScores, default_log_prob

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")

N = 6
SETTINGS = {  # name: Conv keyword arguments (4 input channels)
    "plain": {"kernel_size": 3},
    "stride2-pad1": {"kernel_size": 3, "stride": 2, "padding": 1},
    "dilation2": {"kernel_size": 3, "dilation": 2, "padding": 2},
    "groups2": {"kernel_size": 3, "groups": 2, "padding": 1},
    "depthwise": {"kernel_size": 2, "groups": 4, "stride": 2},
    "same-even": {"kernel_size": 4, "padding": "same"},
    "same-dilated": {"kernel_size": 3, "padding": "same", "dilation": 2},
    "valid-no-bias": {"kernel_size": 3, "padding": "valid", "bias": False},
    "reflect": {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    "circular": {"kernel_size": 3, "padding": 2, "padding_mode": "circular"},
    "replicate-stride": {"kernel_size": 3, "padding": 1, "padding_mode": "replicate", "stride": 2},
}


class ConvPolicy(nn.Module):
    """One convolution (1-D over length 9, or 2-D over 7 x 6), a tanh and a linear head."""

    def __init__(self, dims: int, **conv):
        super().__init__()
        if dims == 2 and "kernel_size" in conv and conv["kernel_size"] == 4:
            conv = {**conv, "kernel_size": (4, 3)}  # rectangular: rows and columns differ
        self.conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 8, **conv)
        self.head = nn.LazyLinear(3)
        self.dims = dims

    def forward(self, obs: Tensor) -> Categorical:
        return Categorical(logits=self.head(torch.tanh(self.conv(obs)).flatten(1)))


def make(dims: int, name: str):
    torch.manual_seed(0)
    policy = ConvPolicy(dims, **SETTINGS[name])
    gen = torch.Generator().manual_seed(1)
    shape = (N, 4, 9) if dims == 1 else (N, 4, 7, 6)
    obs = torch.randn(shape, generator=gen)
    policy(obs)  # materializes the lazy head
    policy = policy.double()
    acts = torch.randint(0, 3, (N,), generator=gen)
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    return policy, obs.double(), acts, adv


def relative(got: Tensor, expected: Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("dims", [1, 2])
def test_factored_conv_rows_equal_the_per_sample_reference(dims, name):
    policy, obs, acts, _ = make(dims, name)
    names = [n for n, _ in policy.named_parameters()]
    with torch.no_grad():
        log_probs = default_log_prob(policy, obs, acts)
    scores = PolicyScores(policy, default_log_prob, obs, acts, names, log_probs)
    operator, reason = build_factored_scores(scores, policy, default_log_prob, obs, acts, 64)
    assert operator is not None, reason
    assert operator.rest is None  # the convolution and the head are both factored
    assert any(isinstance(f, RowsFactor) for f in operator.factors)
    expected = dense_scores(policy, default_log_prob, obs, acts, list(policy.parameters()), N)
    assert relative(operator.dense_rows(torch.arange(N)), expected) <= 1e-8


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_natural_gradient_is_exact_on_the_factored_backend(dims):
    policy, obs, acts, adv = make(dims, "groups2")
    rat = RATNaturalGradient(damping=0.1, solver="cholesky")
    result = rat.natural_gradient(policy, obs, acts, adv)
    assert result.diagnostics.backend == "factored" and not result.diagnostics.fallbacks
    expected = dense_natural_gradient(
        dense_scores(policy, default_log_prob, obs, acts, list(policy.parameters()), N), adv, 0.1
    )
    direction = torch.cat([d.reshape(-1) for d in result.direction])
    assert relative(direction, expected) <= 1e-8


class Unbatched(nn.Module):
    """Calls its Conv2d once per sample on an unbatched ``(C, H, W)`` input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, obs):
        maps = torch.stack([self.conv(o) for o in obs])
        return Categorical(logits=self.head(maps.flatten(1)))


def test_unbatched_convolutions_keep_the_generic_scores():
    torch.manual_seed(0)
    policy = Unbatched().double()
    obs = torch.randn(N, 2, 5, 5, dtype=torch.float64)
    acts = torch.randint(0, 3, (N,))
    names = [n for n, _ in policy.named_parameters()]
    with torch.no_grad():
        log_probs = default_log_prob(policy, obs, acts)
    scores = PolicyScores(policy, default_log_prob, obs, acts, names, log_probs)
    operator, reason = build_factored_scores(scores, policy, default_log_prob, obs, acts, 64)
    assert operator is not None, reason
    assert operator.rest is not None and operator.rest.shape[1] == 2 * 3 * 9 + 3


def test_float32_conv_factors_pass_the_whole_batch_check():
    torch.manual_seed(0)
    policy = ConvPolicy(2, kernel_size=3, stride=2, padding=1, groups=2)
    obs = torch.randn(64, 4, 7, 6)
    policy(obs)
    acts, adv = torch.randint(0, 3, (64,)), torch.randn(64)
    rat = RATNaturalGradient(damping=0.1, solver="cholesky")
    rat(policy, obs, acts, adv)
    assert rat.diagnostics.backend == "factored" and not rat.diagnostics.fallbacks
