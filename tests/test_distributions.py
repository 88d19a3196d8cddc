"""natgrad.distributions: per-sample quantities summed over action dimensions."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import (
    Beta,
    Categorical,
    Independent,
    Normal,
    kl_divergence,
)

from natgrad import distributions as D
from natgrad.scores import default_log_prob

N, K = 7, 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(seed: int = 0) -> Normal:
    g = _gen(seed)
    return Normal(torch.randn(N, K, generator=g), torch.rand(N, K, generator=g) + 0.5)


def _categorical(seed: int = 0) -> Categorical:
    return Categorical(logits=torch.randn(N, 4, generator=_gen(seed)))


def _multi_categorical(seed: int = 0) -> Categorical:
    return Categorical(logits=torch.randn(N, K, 4, generator=_gen(seed)))


# (distribution builder, action shape per sample)
CASES = {
    "normal": (_normal, (K,)),
    "categorical": (_categorical, ()),
    "multi-categorical": (_multi_categorical, (K,)),
    "independent-normal": (lambda seed=0: Independent(_normal(seed), 1), (K,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_quantities_are_the_independent_joint(case):
    make, _ = CASES[case]
    dist, other = make(0), make(1)
    acts = D.sample(dist, _gen(2))
    joint = Independent(dist, 1) if case in ("normal", "multi-categorical") else dist
    joint_other = Independent(other, 1) if case in ("normal", "multi-categorical") else other
    torch.testing.assert_close(D.log_prob(dist, acts), joint.log_prob(acts))
    torch.testing.assert_close(D.entropy(dist), joint.entropy())
    torch.testing.assert_close(D.kl(dist, other), kl_divergence(joint, joint_other))
    torch.testing.assert_close(D.mean_kl(dist, other), kl_divergence(joint, joint_other).mean())
    for value in (D.log_prob(dist, acts), D.entropy(dist), D.kl(dist, other)):
        assert value.shape == (N,)


@pytest.mark.parametrize("case", list(CASES))
def test_sample_uses_the_generator_only(case):
    make, act_shape = CASES[case]
    dist = make(0)
    state = torch.random.get_rng_state()
    first = D.sample(dist, _gen(5))
    assert torch.equal(torch.random.get_rng_state(), state), "touched the global RNG"
    assert first.shape == (N, *act_shape)
    assert torch.equal(first, D.sample(dist, _gen(5)))
    assert not torch.equal(first, D.sample(dist, _gen(6)))


def test_mode_is_argmax_and_mean():
    cat, normal = _categorical(), _normal()
    assert torch.equal(D.mode(cat), cat.probs.argmax(-1))
    assert torch.equal(D.mode(normal), normal.loc)


def test_kl_of_a_distribution_with_itself_is_zero():
    for make, _ in CASES.values():
        assert float(D.mean_kl(make(0), make(0)).abs()) == 0.0


def test_unsupported_distribution_errors_name_the_fix():
    class NoMode(Categorical):
        @property
        def mode(self):
            raise NotImplementedError

    with pytest.raises(TypeError, match="no deterministic action for NoMode"):
        D.mode(NoMode(logits=torch.zeros(2, 3)))
    beta = Beta(torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match=r"SAMPLERS\[Beta\]"):
        D.sample(beta, _gen(0))


def test_a_registered_sampler_is_used_by_subclasses_too(monkeypatch):
    def beta_sampler(dist, generator):
        u = torch.rand(dist.concentration0.shape, generator=generator)
        return u  # Beta(1, 1) is uniform

    monkeypatch.setitem(D.SAMPLERS, Beta, beta_sampler)
    beta = Beta(torch.ones(N), torch.ones(N))
    assert torch.equal(D.sample(beta, _gen(3)), torch.rand(N, generator=_gen(3)))


def test_default_log_prob_is_the_summed_log_prob():
    policy = torch.nn.Linear(4, K)

    def forward(obs):
        return Normal(policy(obs), torch.ones(K))

    model = torch.nn.Module()
    model.forward = forward  # type: ignore[method-assign]
    obs, acts = torch.randn(N, 4, generator=_gen(0)), torch.randn(N, K, generator=_gen(1))
    expected = Normal(policy(obs), torch.ones(K)).log_prob(acts).sum(-1)
    assert torch.equal(default_log_prob(model, obs, acts), expected)


@pytest.mark.parametrize(
    ("act_dim", "width"),
    [(1, 3), (2, 3)],  # (N, 3) against one action dimension broadcast and summed silently
)
@pytest.mark.parametrize("validate", [False, True])
def test_actions_of_the_wrong_width_are_refused(act_dim, width, validate, monkeypatch):
    from natgrad.errors import ArgumentError

    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", validate)
    dist = Independent(Normal(torch.zeros(4, act_dim), torch.ones(4, act_dim)), 1)
    with pytest.raises(ArgumentError, match=rf"acts of shape \(4, {width}\) .*\(4, {act_dim}\)"):
        D.log_prob(dist, torch.zeros(4, width))
