"""Bad input gets a clear error naming the argument, the problem and the fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cases import BatchNormMLP, CategoricalCNN, GaussianMLP
from torch import nn

from natgrad import (
    ArgumentError,
    ArgumentTypeError,
    NatgradError,
    NotConvergedError,
    NotConvergedWarning,
    PolicyMutationError,
    RATNaturalGradient,
    SampleCouplingError,
)


def gaussian_batch(n=16, dtype=torch.float32):
    torch.manual_seed(0)
    policy = GaussianMLP().to(dtype)
    return (
        policy,
        torch.randn(n, 5, dtype=dtype),
        torch.randn(n, 3, dtype=dtype),
        torch.randn(n, dtype=dtype),
    )


def snapshot(policy):
    return [
        (p.detach().clone(), None if p.grad is None else p.grad.clone())
        for p in policy.parameters()
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"damping": -0.1}, ValueError, r"damping must be a finite float > 0, got -0.1; typical"),
        ({"damping": 0.0}, ValueError, r"damping must be a finite float > 0, got 0.0"),
        ({"damping": math.nan}, ValueError, r"damping must be a finite float > 0, got nan"),
        ({"damping": math.inf}, ValueError, r"damping must be a finite float > 0, got inf"),
        ({"damping": "big"}, TypeError, r"damping must be a finite float > 0, got 'big'"),
        ({"block_size": 0}, ValueError, r"block_size must be an integer >= 1, got 0"),
        (
            {"preconditioner_rank": -1},
            ValueError,
            r"preconditioner_rank must be an integer >= 0, got -1",
        ),
        ({"compile": 1}, TypeError, r"compile must be True or False, got 1"),
        ({"block_size": 2.5}, TypeError, r"block_size must be an integer >= 1, got 2.5"),
        ({"max_epochs": 0}, ValueError, r"max_epochs must be an integer >= 1, got 0"),
        ({"max_iters": -3}, ValueError, r"max_iters must be an integer >= 1, got -3"),
        ({"tol": 0}, ValueError, r"tol must be a float in \(0, 1\), got 0"),
        # a relative tolerance of 100% or more makes "converged" say nothing
        ({"tol": 1.5}, ValueError, r"tol must be a float in \(0, 1\), got 1.5 \(it is relative"),
        ({"tol": 1.0}, ValueError, r"tol must be a float in \(0, 1\), got 1.0"),
        ({"tol": np.float64(2.0)}, ValueError, r"tol must be a float in \(0, 1\)"),
        ({"tol": "1e-3"}, TypeError, r"tol must be a float in \(0, 1\), got '1e-3'"),
        (
            {"solver": "lbfgs"},
            ValueError,
            r"solver must be one of 'auto', 'kaczmarz', 'cholesky', 'cg', "
            r"'accelerated_kaczmarz', got 'lbfgs'",
        ),
        (
            {"backend": "gpu"},
            ValueError,
            r"backend must be one of 'auto', 'factored', 'materialized', 'streaming'",
        ),
        ({"seed": 1.5}, TypeError, r"seed must be an int or None, got 1.5"),
        # torch.Generator.manual_seed overflows above 2**64 - 1 and wraps negatives around
        (
            {"seed": 2**70},
            ValueError,
            r"seed must be an integer in \[0, 2\*\*64 - 1\] or None, got 1180591620717411303424",
        ),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[0, 2\*\*64 - 1\]"),
        ({"seed": -1}, ValueError, r"got -1: torch's generators take unsigned 64-bit seeds"),
        ({"log_prob_fn": 3}, TypeError, r"log_prob_fn must be callable"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message) as refused:
        RATNaturalGradient(**kwargs)
    assert isinstance(refused.value, NatgradError)  # one except NatgradError catches it


def test_every_seed_torch_takes_is_accepted():
    assert RATNaturalGradient(seed=2**64 - 1).generator.initial_seed() == 2**64 - 1
    assert RATNaturalGradient(seed=np.uint64(2**64 - 1)).generator.initial_seed() == 2**64 - 1
    assert RATNaturalGradient(seed=0).generator.initial_seed() == 0


def test_mismatched_sample_dimensions():
    policy, obs, acts, adv = gaussian_batch()
    with pytest.raises(ValueError, match=r"obs has 15 rows .* adv has N = 16 samples"):
        RATNaturalGradient()(policy, obs[:15], acts, adv)
    with pytest.raises(ValueError, match=r"acts has 12 rows .* adv has N = 16"):
        RATNaturalGradient()(policy, obs, acts[:12], adv)


def test_adv_must_be_one_dimensional():
    policy, obs, acts, adv = gaussian_batch()
    with pytest.raises(
        ValueError, match=r"adv must be 1-D of shape \(N,\), got shape \(16, 1\); flatten"
    ):
        RATNaturalGradient()(policy, obs, acts, adv[:, None])


def test_empty_batch():
    policy, obs, acts, adv = gaussian_batch()
    with pytest.raises(ValueError, match=r"adv is empty \(N = 0\)"):
        RATNaturalGradient()(policy, obs[:0], acts[:0], adv[:0])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_advantages(bad):
    policy, obs, acts, adv = gaussian_batch()
    adv = adv.clone()
    adv[3] = bad
    with pytest.raises(ValueError, match=r"adv contains 1 non-finite value"):
        RATNaturalGradient()(policy, obs, acts, adv)


def test_non_finite_log_probs():
    def log_prob_fn(policy, obs, acts):  # -inf where an observation is all zeros
        return policy(obs).log_prob(acts).sum(-1) + torch.log(obs.abs().sum(-1))

    policy, obs, acts, adv = gaussian_batch()
    obs = obs.clone()
    obs[2] = 0.0
    with pytest.raises(
        ValueError, match=r"log_prob_fn returned a non-finite log-probability for sample 2 \(-inf\)"
    ):
        RATNaturalGradient(log_prob_fn)(policy, obs, acts, adv)


def test_log_prob_with_action_dimension_is_rejected():
    policy, obs, acts, adv = gaussian_batch()
    per_dim = lambda p, o, a: p(o).log_prob(a)  # noqa: E731 - (N, 3), forgot to sum
    with pytest.raises(
        ValueError, match=r"must return shape \(N,\) = \(16,\), got \(16, 3\).*\.sum\(-1\)"
    ):
        RATNaturalGradient(per_dim)(policy, obs, acts, adv)


def test_policy_that_is_not_a_distribution():
    policy = nn.Linear(5, 3)
    with pytest.raises(
        TypeError, match=r"log_prob_fn=None expects policy\(obs\) to return a torch.distributions"
    ):
        RATNaturalGradient()(policy, torch.randn(4, 5), torch.randn(4, 3), torch.randn(4))


def test_params_not_owned_by_policy():
    policy, obs, acts, adv = gaussian_batch()
    stranger = nn.Parameter(torch.zeros(2))
    with pytest.raises(
        ValueError, match=r"params\[1\] \(shape \(2,\)\) is not a parameter of policy"
    ):
        RATNaturalGradient()(policy, obs, acts, adv, params=[policy.log_std, stranger])


def test_a_buffer_in_params_is_named_as_a_buffer():
    policy, obs, acts, adv = gaussian_batch()
    policy.register_buffer("scale", torch.ones(3))
    with pytest.raises(
        ValueError, match=r"not a parameter of policy \(it is the buffer policy.scale"
    ):
        RATNaturalGradient()(policy, obs, acts, adv, params=[policy.log_std, policy.scale])


def test_params_single_tensor_and_frozen_and_empty():
    policy, obs, acts, adv = gaussian_batch()
    with pytest.raises(TypeError, match=r"got a single tensor; wrap it in a list"):
        RATNaturalGradient()(policy, obs, acts, adv, params=policy.log_std)
    with pytest.raises(ValueError, match=r"params is empty"):
        RATNaturalGradient()(policy, obs, acts, adv, params=[])
    policy.log_std.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params\[0\] \(log_std\) has requires_grad=False"):
        RATNaturalGradient()(policy, obs, acts, adv, params=[policy.log_std])


def test_no_trainable_parameters():
    policy, obs, acts, adv = gaussian_batch()
    policy.requires_grad_(False)
    with pytest.raises(ValueError, match=r"policy has no parameters with requires_grad=True"):
        RATNaturalGradient()(policy, obs, acts, adv)


def test_batchnorm_in_train_mode():
    policy = BatchNormMLP()
    obs, acts, adv = torch.randn(8, 5), torch.randint(0, 4, (8,)), torch.randn(8)
    with pytest.raises(
        ValueError, match=r"policy.net.1 is a BatchNorm1d in train mode.*policy.eval\(\)"
    ):
        RATNaturalGradient()(policy, obs, acts, adv)


def test_active_dropout():
    class DropoutPolicy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.Linear(8, 3))

        def forward(self, obs):
            return torch.distributions.Categorical(logits=self.net(obs))

    policy = DropoutPolicy()
    obs, acts, adv = torch.randn(8, 5), torch.randint(0, 3, (8,)), torch.randn(8)
    with pytest.raises(
        ValueError, match=r"policy.net.1 is an active Dropout\(p=0.2\).*policy.eval\(\)"
    ):
        RATNaturalGradient()(policy, obs, acts, adv)
    policy.eval()
    RATNaturalGradient()(policy, obs, acts, adv)  # fine once dropout is off


def test_dtype_mismatches():
    policy, obs, acts, adv = gaussian_batch()
    with pytest.raises(
        TypeError, match=r"obs has dtype torch.float64 but the policy parameters are torch.float32"
    ):
        RATNaturalGradient()(policy, obs.double(), acts, adv)
    with pytest.raises(
        TypeError, match=r"adv must be a floating-point tensor, got dtype torch.int64"
    ):
        RATNaturalGradient()(policy, obs, acts, torch.ones(16, dtype=torch.long))


def test_device_mismatch():
    policy, obs, acts, adv = gaussian_batch()
    with pytest.raises(ValueError, match=r"obs is on meta but the policy parameters are on cpu"):
        RATNaturalGradient()(policy, obs.to("meta"), acts, adv)
    with pytest.raises(ValueError, match=r"adv is on meta but the policy parameters are on cpu"):
        RATNaturalGradient()(policy, obs, acts, adv.to("meta"))


def test_obs_leaf_must_be_tensor():
    policy = CategoricalCNN()
    with pytest.raises(
        TypeError,
        match=r"obs\[.image.\] must be a torch.Tensor .*got ndarray; convert it with torch",
    ):
        RATNaturalGradient()(
            policy,
            {"image": np.zeros((2, 2, 6, 6), dtype=np.float32)},
            torch.zeros(2, dtype=torch.long),
            torch.randn(2),
        )


def test_policy_must_be_module():
    with pytest.raises(TypeError, match=r"policy must be a torch.nn.Module, got function"):
        RATNaturalGradient()(lambda o: o, torch.randn(2, 5), torch.randn(2, 3), torch.randn(2))


def test_policy_coupling_samples_is_detected():
    class BatchCoupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(5, 3)

        def forward(self, obs):
            h = self.net(obs)
            return torch.distributions.Categorical(logits=h - h.mean(0))  # batch statistic

    policy = BatchCoupled()
    obs, acts, adv = torch.randn(8, 5), torch.randint(0, 3, (8,)), torch.randn(8)
    with pytest.raises(ValueError, match=r"policy couples samples within a batch"):
        RATNaturalGradient()(policy, obs, acts, adv)


def test_random_log_prob_is_rejected():
    def noisy(policy, obs, acts):
        return policy(obs + 0.1 * torch.randn_like(obs)).log_prob(acts).sum(-1)

    policy, obs, acts, adv = gaussian_batch()
    with pytest.raises(ValueError, match=r"draws random numbers"):
        RATNaturalGradient(noisy)(policy, obs, acts, adv)


def test_inputs_policy_and_gradients_are_untouched():
    policy, obs, acts, adv = gaussian_batch(dtype=torch.float64)
    policy(obs).log_prob(acts).sum().backward()  # pre-existing .grad must survive
    before = snapshot(policy)
    copies = obs.clone(), acts.clone(), adv.clone()
    for solver in ("kaczmarz", "cholesky", "cg"):
        RATNaturalGradient(solver=solver, block_size=4)(policy, obs, acts, adv)
    for (p0, g0), p in zip(before, policy.parameters(), strict=True):
        assert torch.equal(p0, p.detach()) and torch.equal(g0, p.grad)
    assert all(torch.equal(a, b) for a, b in zip(copies, (obs, acts, adv), strict=True))


def test_nonconvergence_policies():
    policy, obs, acts, adv = gaussian_batch(n=32, dtype=torch.float64)
    settings = {"damping": 1e-4, "solver": "kaczmarz", "block_size": 4, "max_epochs": 1}
    settings |= {"tol": 1e-10, "seed": 0}
    with pytest.raises(
        NotConvergedError,
        match=r"solver='kaczmarz' stopped at relative residual .* > tol=1e-10 after 1 epochs",
    ):
        RATNaturalGradient(**settings, on_nonconvergence="raise")(policy, obs, acts, adv)
    with pytest.warns(NotConvergedWarning):
        RATNaturalGradient(**settings, on_nonconvergence="warn")(policy, obs, acts, adv)
    rat = RATNaturalGradient(**settings)
    exact = RATNaturalGradient(damping=1e-4, solver="cholesky")(policy, obs, acts, adv)
    assert torch.allclose(rat(policy, obs, acts, adv), exact, rtol=1e-8, atol=1e-10)
    assert rat.diagnostics.solver == "cholesky" and rat.diagnostics.converged
    assert "solved exactly with cholesky" in rat.diagnostics.fallbacks[0]


def test_step_size_rejects_bad_kl():
    policy, obs, acts, adv = gaussian_batch()
    result = RATNaturalGradient(damping=1e-2).natural_gradient(policy, obs, acts, adv)
    with pytest.raises(ValueError, match=r"max_kl must be a finite float > 0, got -1"):
        result.step_size(-1)


def categorical_batch(n=24):
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    obs, adv = torch.randn(n, 4, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    return policy, obs, torch.randint(0, 3, (n,)), adv


def categorical_log_prob(policy, obs, acts):
    return torch.distributions.Categorical(logits=policy(obs)).log_prob(acts)


@pytest.mark.parametrize(
    "bad_input",
    [
        lambda p, o, a, adv: (p, o[:0], a[:0], adv[:0]),  # empty
        lambda p, o, a, adv: (p, o[:5], a, adv),  # lengths differ
        lambda p, o, a, adv: (p, o, a, adv[:, None]),  # 2-D adv
        lambda p, o, a, adv: (p, o, a, adv.long()),  # integer adv
        lambda p, o, a, adv: (p, o.float(), a, adv),  # obs dtype
        lambda p, o, a, adv: (nn.Sequential(p, nn.BatchNorm1d(3)).double(), o, a, adv),
        lambda p, o, a, adv: ("not a module", o, a, adv),
    ],
)
def test_argument_refusals_are_natgrad_errors(bad_input):
    with pytest.raises((ArgumentError, ArgumentTypeError)) as refused:
        RATNaturalGradient(categorical_log_prob)(*bad_input(*categorical_batch()))
    assert isinstance(refused.value, NatgradError)


@pytest.mark.parametrize("backend", ["auto", "materialized", "streaming"])
@pytest.mark.parametrize("detach", ["detach", "no_grad"])
def test_a_detached_log_prob_fn_is_refused_not_answered_with_a_over_damping(backend, detach):
    def detached(policy, obs, acts):
        if detach == "no_grad":
            with torch.no_grad():
                return categorical_log_prob(policy, obs, acts)
        return categorical_log_prob(policy, obs, acts).detach()

    policy, obs, acts, adv = categorical_batch()
    with pytest.raises(ArgumentError, match=r"log_prob_fn returned log-probabilities that do not"):
        RATNaturalGradient(detached, backend=backend)(policy, obs, acts, adv)


@pytest.mark.parametrize("coupled", [1, 6, 13, 20])
def test_coupling_between_any_two_samples_is_caught_by_the_default_backend(coupled):
    class OneCoupledPair(nn.Module):
        """Sample ``coupled`` reads sample ``coupled + 1`` (before a Linear layer)."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, obs):
            if obs.shape[0] > coupled + 1:
                mixed = obs[coupled] + 3 * obs[coupled + 1]
                obs = torch.cat([obs[:coupled], mixed[None], obs[coupled + 1 :]])
            return torch.distributions.Categorical(logits=self.net(obs))

    _, obs, acts, adv = categorical_batch()
    policy = OneCoupledPair().double()
    with pytest.raises(SampleCouplingError, match=rf"sample {coupled}: .* alone vs"):
        RATNaturalGradient()(policy, obs, acts, adv)


def test_parameters_of_several_dtypes_are_refused():
    class MixedPrecision(nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = nn.Linear(4, 2)  # float32
            self.log_std = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self, obs):
            loc = self.mean(obs.float()).double()
            return torch.distributions.Normal(loc, self.log_std.exp())

    obs, acts = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    with pytest.raises(
        ArgumentTypeError, match=r"several dtypes .*policy.log_std is torch.float64"
    ):
        RATNaturalGradient().natural_gradient(MixedPrecision(), obs, acts, torch.randn(16))


@pytest.mark.parametrize("kind", ["categorical", "normal"])
def test_actions_with_a_trailing_singleton_dimension_are_refused_naming_squeeze(kind):
    policy, obs, acts, adv = categorical_batch()
    if kind == "normal":  # one action dimension: loc of shape (N,)
        policy = nn.Linear(4, 1).double()

        def log_prob_fn(pol, o, a):
            return torch.distributions.Normal(pol(o).squeeze(-1), 1.0).log_prob(a)

        acts = torch.randn(len(adv), dtype=torch.float64)
    else:
        log_prob_fn = None
        policy = nn.Sequential(policy, _AsCategorical())
    # natgrad's log_prob sees the distribution; a log_prob_fn of the user's, its output
    message = r"acts of shape \(24, 1\) .*" if kind == "categorical" else r"got \(24, 24\).*"
    with pytest.raises(ArgumentError, match=message + r"acts.squeeze\(-1\)"):
        RATNaturalGradient(log_prob_fn)(policy, obs, acts[:, None], adv)


class _AsCategorical(nn.Module):
    def forward(self, logits):
        return torch.distributions.Categorical(logits=logits)


@pytest.mark.parametrize("validate", [True, False])
def test_discrete_actions_outside_the_support_are_natgrads_error(validate):
    policy, obs, acts, adv = categorical_batch()
    policy = nn.Sequential(policy, _AsCategorical())
    default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(validate)
    try:
        for bad in (acts + 5, acts - 5):
            with pytest.raises(ArgumentError, match=r"acts holds actions outside the support"):
                RATNaturalGradient()(policy, obs, bad, adv)
    finally:
        torch.distributions.Distribution.set_default_validate_args(default)


def test_a_policy_on_the_meta_device_is_refused():
    policy = nn.Sequential(nn.Linear(4, 3), _AsCategorical()).to("meta")
    obs, acts, adv = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.randn(8)
    with pytest.raises(ArgumentError, match=r"meta device"):
        RATNaturalGradient()(policy, obs.to("meta"), acts.to("meta"), adv.to("meta"))


def test_rrelu_in_train_mode_is_refused_as_random_not_as_coupling():
    policy, obs, acts, adv = categorical_batch()
    policy = nn.Sequential(nn.Linear(4, 8), nn.RReLU(), nn.Linear(8, 3), _AsCategorical())
    with pytest.raises(ArgumentError, match=r"policy.1 is an RReLU in train mode"):
        RATNaturalGradient()(policy.double(), obs, acts, adv)
    policy.eval()  # a fixed slope: accepted
    RATNaturalGradient()(policy.double(), obs, acts, adv)


class _SharedTrunk(nn.Module):
    """A submodule reachable under two names, as SB3's shared features extractor."""

    def __init__(self, outputs: int = 3, categorical: bool = True):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.actor_trunk = self.trunk  # the same module under a second name
        self.head = nn.Linear(8, outputs)
        self.categorical = categorical

    def forward(self, obs):
        out = self.head(self.actor_trunk(obs))
        return torch.distributions.Categorical(logits=out) if self.categorical else out


def _natural_gradient_of_every_kind(kind, model, obs, acts, adv):
    from natgrad.rl.algorithms.linesearch import backtracking_line_search
    from natgrad.supervised import natural_gradient

    if kind in ("auto", "materialized", "streaming"):
        RATNaturalGradient(backend=kind)(model, obs, acts, adv)
        RATNaturalGradient(backend=kind).natural_gradient(model, obs, acts, adv)
    elif kind == "expected-fisher":
        RATNaturalGradient(fisher="expected").natural_gradient(model, obs, acts, adv)
    elif kind.startswith("supervised"):
        fisher = kind.split("-")[1]
        natural_gradient(model, obs, torch.randn(len(obs), 2, dtype=obs.dtype), fisher=fisher)
    else:  # the RL agents' line search
        with torch.no_grad():
            old = model(obs)
            names = [n for n, _ in model.named_parameters()]
            step = [torch.full_like(p, 1e-3) for p in model.parameters()]
            backtracking_line_search(
                model, names, step, obs, acts, old.log_prob(acts), adv, old, 0.01, 10, 0.5
            )


@pytest.mark.parametrize(
    "kind",
    [
        "auto",
        "materialized",
        "streaming",
        "expected-fisher",
        "supervised-exact",
        "supervised-sampled",
        "line-search",
    ],
)
def test_a_module_reachable_under_two_names_keeps_its_parameter_objects(kind):
    """SB3's shared features extractor: torch.func.functional_call used to leave substituted
    tensors registered, detaching the model from the optimizer holding the originals."""
    _, obs, acts, adv = categorical_batch()
    model = _SharedTrunk(2, categorical=False) if kind.startswith("supervised") else _SharedTrunk()
    model.double()
    before = [(name, p, p.requires_grad) for name, p in model.named_parameters()]
    _natural_gradient_of_every_kind(kind, model, obs, acts, adv)
    after = dict(model.named_parameters())
    for name, param, requires_grad in before:
        assert after[name] is param and param.requires_grad == requires_grad, name


def test_a_scalar_adv_is_natgrads_error_not_an_index_error():
    policy, obs, acts, adv = gaussian_batch()
    with pytest.raises(ArgumentError, match=r"got shape \(\); pass one advantage per sample"):
        RATNaturalGradient()(policy, obs, acts, adv[0])
    with pytest.raises(ArgumentError, match=r"got shape \(1, 16\); flatten it with"):
        RATNaturalGradient()(policy, obs, acts, adv[None, :])


@pytest.mark.parametrize(
    ("cast", "error", "message"),
    [
        (lambda t: t.long(), ArgumentTypeError, r"real floating-point .* got dtype torch.int64"),
        (
            lambda t: t.to(torch.complex64),
            ArgumentTypeError,
            r"real floating-point .* got dtype torch.complex64",
        ),
        (lambda t: t.to("meta"), ArgumentError, r"log-probabilities on meta but the policy"),
    ],
)
def test_log_prob_fn_output_of_a_wrong_dtype_or_device_is_natgrads_error(cast, error, message):
    policy, obs, acts, adv = gaussian_batch()
    log_prob_fn = lambda p, o, a: cast(p(o).log_prob(a).sum(-1))  # noqa: E731
    with pytest.raises(error, match=message):
        RATNaturalGradient(log_prob_fn)(policy, obs, acts, adv)


def test_a_parameter_written_by_forward_is_restored_as_the_message_says():
    class Drifting(GaussianMLP):
        def forward(self, obs):
            with torch.no_grad():
                self.log_std.add_(1e-3)  # e.g. a misplaced annealing step
            return super().forward(obs)

    torch.manual_seed(0)
    policy = Drifting()
    _, obs, acts, adv = gaussian_batch()
    before = policy.log_std.detach().clone()
    with pytest.raises(PolicyMutationError, match=r"changed policy.log_std \(restored\)"):
        RATNaturalGradient()(policy, obs, acts, adv)
    assert torch.equal(policy.log_std.detach(), before)


def test_a_parameter_reassigned_by_forward_is_put_back():
    class Reassigning(GaussianMLP):
        def forward(self, obs):
            self.log_std = nn.Parameter(self.log_std.detach() + 1.0)
            return super().forward(obs)

    torch.manual_seed(0)
    policy = Reassigning()
    _, obs, acts, adv = gaussian_batch()
    original = policy.log_std
    before = original.detach().clone()
    with pytest.raises(PolicyMutationError, match=r"changed policy.log_std"):
        RATNaturalGradient()(policy, obs, acts, adv)
    assert policy.log_std is original and torch.equal(original.detach(), before)


def test_parameters_on_meta_or_uninitialized_are_natgrads_error():
    policy, obs, acts, adv = gaussian_batch()
    policy.mean.to("meta")  # part of the policy left on meta
    for params in (None, list(policy.body.parameters())):
        with pytest.raises(ArgumentError, match=r"policy.mean.weight is on the meta device"):
            RATNaturalGradient()(policy, obs, acts, adv, params=params)
    lazy = nn.Sequential(nn.LazyLinear(3), _AsCategorical())
    with pytest.raises(ArgumentError, match=r"policy.0.weight is uninitialized \(a Lazy module"):
        RATNaturalGradient()(lazy, obs, torch.randint(0, 3, (16,)), adv)


def test_params_given_as_a_module_a_dict_or_named_pairs_say_what_to_pass():
    policy, obs, acts, adv = gaussian_batch()
    cases = [
        (policy.body, r"got a Sequential; pass its .parameters\(\)"),
        (dict(policy.named_parameters()), r"got a dict; pass its .values\(\)"),
        (policy.named_parameters(), r"got tuple; pass .parameters\(\), not .named_parameters"),
    ]
    for params, message in cases:
        with pytest.raises(ArgumentTypeError, match=message):
            RATNaturalGradient()(policy, obs, acts, adv, params=params)


def test_a_forward_that_writes_obs_in_place_is_stopped_after_one_evaluation():
    class Normalizing(GaussianMLP):
        def forward(self, obs):
            obs.mul_(0.5)  # meant obs = obs * 0.5
            return super().forward(obs)

    torch.manual_seed(0)
    policy = Normalizing()
    _, obs, acts, adv = gaussian_batch()
    original = obs.clone()
    with pytest.raises(PolicyMutationError, match=r"wrote obs in place .* out of place"):
        RATNaturalGradient()(policy, obs, acts, adv)
    assert torch.equal(obs, original * 0.5)  # one evaluation, as policy(obs) would do


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_selected_parameters_on_several_devices_are_natgrads_error():
    policy, obs, acts, adv = gaussian_batch()
    policy.mean.cuda()
    with pytest.raises(ArgumentError, match=r"policy parameters are on several devices"):
        RATNaturalGradient()(policy, obs, acts, adv)


@pytest.mark.parametrize("method", ["__call__", "natural_gradient"])
def test_a_call_that_raises_leaves_no_stale_diagnostics(method):
    policy, obs, acts, adv = gaussian_batch(n=32, dtype=torch.float64)
    rat = RATNaturalGradient(damping=1e-4, solver="kaczmarz", block_size=4, max_epochs=1)
    getattr(rat, method)(policy, obs, acts, adv)
    assert rat.diagnostics is not None
    with pytest.raises(ArgumentError):
        getattr(rat, method)(policy, obs, acts, adv[:3])
    assert rat.diagnostics is None  # not the previous call's "converged"
    rat.options = rat.options.replace(tol=1e-10, on_nonconvergence="raise")
    with pytest.raises(NotConvergedError):
        getattr(rat, method)(policy, obs, acts, adv)
    assert rat.diagnostics is None


def test_an_embedding_with_max_norm_is_refused_with_its_own_fix():
    """nn.Embedding(max_norm=...) renormalizes its weight in place in any mode: the message
    must not stop at 'call policy.eval()', which does not help."""

    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 3, max_norm=0.5)
            self.head = nn.Linear(3, 3)

        def forward(self, obs):
            return torch.distributions.Categorical(logits=self.head(self.embed(obs)))

    torch.manual_seed(0)
    policy = Embedded().eval()
    obs, acts, adv = torch.randint(0, 6, (8,)), torch.randint(0, 3, (8,)), torch.randn(8)
    before = policy.embed.weight.detach().clone()
    with pytest.raises(PolicyMutationError, match=r"policy.embed is an Embedding with max_norm"):
        RATNaturalGradient()(policy, obs, acts, adv)
    assert torch.equal(policy.embed.weight.detach(), before)


@pytest.mark.parametrize("backend", ["auto", "materialized"])
def test_a_checkpointed_policy_is_not_called_coupling_of_samples(backend):
    """torch.func cannot differentiate torch.utils.checkpoint at all: the refusal says so
    instead of blaming batch statistics (the batch fails under torch.func as well)."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, obs):
            hidden = checkpoint(lambda x: torch.tanh(self.body(x)), obs, use_reentrant=False)
            return torch.distributions.Categorical(logits=self.head(hidden))

    obs, acts, adv = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.randn(8)
    with pytest.raises(ArgumentError, match="cannot be differentiated with torch.func, even on"):
        RATNaturalGradient(backend=backend)(Checkpointed(), obs, acts, adv)
