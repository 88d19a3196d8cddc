"""Regression tests for the trust issue: every result correct, honestly flagged, or refused.

Each test reproduces one hostile-but-legitimate input that used to return a silent wrong
answer or a raw error from deep inside torch; the references are dense float64 solves from
per-sample gradients taken one at a time (tests/reference.py).
"""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import dense_natural_gradient, dense_scores, reference_log_prob
from torch import nn

from natgrad import (
    IllConditionedError,
    NonFiniteError,
    PolicyMutationError,
    PrecisionWarning,
    RATNaturalGradient,
    SampleCouplingError,
)
from natgrad.supervised import SupervisedNaturalGradient

D = torch.float64


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(D), b.to(D)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class Gaussian(nn.Module):
    def __init__(self, obs_dim: int = 4, hidden: int = 8, act_dim: int = 2, log_std=0.0):
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, act_dim))
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std)))

    def forward(self, obs):
        return torch.distributions.Normal(self.mean(obs), self.log_std.exp())


def reference_direction(policy, obs, acts, adv, damping, log_prob_fn=reference_log_prob):
    """Dense float64 direction of a float64 copy of ``policy``."""
    policy = copy.deepcopy(policy).double()
    cast = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    obs = {k: cast(v) for k, v in obs.items()} if isinstance(obs, dict) else cast(obs)
    params = list(policy.parameters())
    scores = dense_scores(policy, log_prob_fn, obs, cast(acts), params, adv.shape[0])
    return dense_natural_gradient(scores, adv.double(), damping), scores


def reference_advantages(scores: torch.Tensor, adv: torch.Tensor, damping: float):
    n = scores.shape[0]
    kernel = scores @ scores.T / n + damping * torch.eye(n, dtype=D)
    return torch.linalg.solve(kernel, adv.double())


# -- 1. the factored backend is verified on the whole batch -----------------------------------
class GoalConditioned(nn.Module):
    """Reuses ``enc.weight`` outside its module for the goal."""

    def __init__(self):
        super().__init__()
        self.enc, self.out = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, obs):
        hidden = torch.tanh(self.enc(obs["state"]) + F.linear(obs["goal"], self.enc.weight))
        return torch.distributions.Categorical(logits=self.out(hidden))


@pytest.mark.parametrize("zero_goals", [0, 8, 63])
def test_reused_weight_is_caught_wherever_the_reuse_shows(zero_goals):
    torch.manual_seed(0)
    n = 64
    policy = GoalConditioned().double()
    obs = {"state": torch.randn(n, 4, dtype=D), "goal": torch.randn(n, 4, dtype=D)}
    obs["goal"][:zero_goals] = 0  # the prefix a few-sample probe would have looked at
    acts, adv = torch.randint(0, 3, (n,)), torch.randn(n, dtype=D)
    rat = RATNaturalGradient(damping=1e-2, solver="cholesky")
    result = rat.natural_gradient(policy, obs, acts, adv)
    expected, _ = reference_direction(policy, obs, acts, adv, 1e-2)
    assert relative(flat(result.direction), expected) <= 1e-8
    assert rat.diagnostics.backend != "factored"
    assert any("disagree with autograd" in note for note in rat.diagnostics.fallbacks)


def test_verified_factored_backend_still_used_for_plain_linear_layers():
    torch.manual_seed(0)
    policy = Gaussian().double()
    obs, acts, adv = (
        torch.randn(32, 4, dtype=D),
        torch.randn(32, 2, dtype=D),
        torch.randn(32, dtype=D),
    )
    rat = RATNaturalGradient(damping=1e-2, solver="cholesky")
    result = rat.natural_gradient(policy, obs, acts, adv)
    assert rat.diagnostics.backend == "factored"
    expected, _ = reference_direction(policy, obs, acts, adv, 1e-2)
    assert relative(flat(result.direction), expected) <= 1e-8


# -- 2. converged means the direction is accurate ----------------------------------------------
def confident_mistakes(n: int = 96, classes: int = 8, scale: float = 20.0):
    torch.manual_seed(0)
    x = torch.randn(n, 3, dtype=D)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
        y = model(x).argmax(1)
    y[:10] = (y[:10] + 1) % classes  # confidently misclassified: p_y ~ 1e-12
    return model, x, y


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
@pytest.mark.parametrize("solver", ["kaczmarz", "cg"])
def test_supervised_converged_direction_is_within_tol(solver, tol):
    model, x, y = confident_mistakes()
    exact = SupervisedNaturalGradient("cross_entropy", 1e-3, solver="cholesky")(model, x, y)
    transform = SupervisedNaturalGradient(
        "cross_entropy", 1e-3, solver=solver, tol=tol, seed=0, on_nonconvergence="warn"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = transform(model, x, y)
    error = relative(flat(result.direction), flat(exact.direction))
    if result.diagnostics.converged:
        assert result.diagnostics.direction_error <= tol
        assert error <= tol * (1 + 1e-6) + 1e-9  # the bound holds
    else:
        assert result.diagnostics.direction_error > tol  # honestly flagged


def test_rl_converged_direction_is_within_tol_on_a_wide_rhs():
    """Advantages spanning 12 orders of magnitude: the residual alone would stop early."""
    torch.manual_seed(0)
    policy = Gaussian(hidden=16).double()
    n = 128
    obs, acts = torch.randn(n, 4, dtype=D), torch.randn(n, 2, dtype=D)
    adv = torch.randn(n, dtype=D) * torch.logspace(-6, 6, n, dtype=D)
    expected, _ = reference_direction(policy, obs, acts, adv, 1e-3)
    for solver in ("cg", "kaczmarz"):
        rat = RATNaturalGradient(
            damping=1e-3,
            solver=solver,
            tol=1e-3,
            seed=0,
            on_nonconvergence="warn",
            block_size=32,
            max_epochs=200,
            preconditioner_rank=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = rat.natural_gradient(policy, obs, acts, adv)
        if rat.diagnostics.converged:
            assert relative(flat(result.direction), expected) <= 1e-3


# -- 3. scale and precision ------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["cg", "kaczmarz", "cholesky"])
@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1e-50, 1e50, 1e200])
def test_transform_is_linear_in_the_advantages_at_any_scale(solver, scale):
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 3)).double()

    def log_prob(p, o, a):
        return torch.distributions.Categorical(logits=p(o)).log_prob(a)

    obs, acts, adv = (
        torch.randn(64, 4, dtype=D),
        torch.randint(0, 3, (64,)),
        torch.randn(64, dtype=D),
    )
    options = dict(damping=1e-2, solver=solver, tol=1e-10, seed=0, on_nonconvergence="raise")
    options.update(max_epochs=2000, block_size=16) if solver == "kaczmarz" else None
    unit = RATNaturalGradient(log_prob, **options)(policy, obs, acts, adv)
    rat = RATNaturalGradient(log_prob, **options)
    scaled = rat(policy, obs, acts, adv * scale)
    assert bool(torch.isfinite(scaled).all()) and bool((scaled != 0).any())
    assert relative(scaled / scale, unit) <= 1e-8
    assert rat.diagnostics.solver == solver


def test_float16_policy_with_tiny_advantages_is_not_a_over_lambda():
    torch.manual_seed(0)
    policy = Gaussian().half()
    obs, acts, adv = torch.randn(64, 4).half(), torch.randn(64, 2).half(), torch.randn(64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        unit = RATNaturalGradient(damping=1e-2, solver="cholesky")(policy, obs, acts, adv)
        for solver in ("cg", "kaczmarz"):
            rat = RATNaturalGradient(damping=1e-2, solver=solver, seed=0, tol=1e-4)
            tiny = rat(policy, obs, acts, adv * 1e-12) / 1e-12
            assert relative(tiny, unit) <= 1e-2, solver


def test_float32_policy_with_tiny_float64_advantages():
    torch.manual_seed(0)
    policy = Gaussian()
    obs, acts, adv = torch.randn(64, 4), torch.randn(64, 2), torch.randn(64, dtype=D)
    unit = RATNaturalGradient(damping=1e-2, solver="cholesky")(policy, obs, acts, adv)
    tiny = RATNaturalGradient(damping=1e-2, seed=0, tol=1e-6)(policy, obs, acts, adv * 1e-50)
    assert tiny.dtype == D
    assert relative(tiny / 1e-50, unit) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_answer_is_within_its_reported_precision(dtype):
    torch.manual_seed(0)
    policy = Gaussian()
    obs, acts, adv = torch.randn(64, 4), torch.randn(64, 2), torch.randn(64)
    expected, _ = reference_direction(policy, obs, acts, adv, 1e-2)
    rat = RATNaturalGradient(damping=1e-2, solver="cholesky")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        result = rat.natural_gradient(
            copy.deepcopy(policy).to(dtype), obs.to(dtype), acts.to(dtype), adv
        )
    error = relative(flat(result.direction), expected)
    assert error <= rat.diagnostics.precision
    # Gram products accumulate in float32: about the half-precision rounding of d itself.
    assert error <= 8 * torch.finfo(dtype).eps * 8


def test_float32_beyond_its_precision_is_refused_or_flagged():
    """damping 1e-8 with N > P: every solver used to return an error ~3 marked converged."""
    torch.manual_seed(0)
    policy = Gaussian()  # P = 60
    obs, acts, adv = torch.randn(256, 4), torch.randn(256, 2), torch.randn(256)
    expected, _ = reference_direction(policy, obs, acts, adv, 1e-8)
    for solver in ("cholesky", "cg", "kaczmarz"):
        rat = RATNaturalGradient(damping=1e-8, solver=solver, seed=0)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = rat.natural_gradient(policy, obs, acts, adv)
        except IllConditionedError as error:
            assert "damping" in str(error)
            continue
        error = relative(flat(result.direction), expected)
        flagged = any(issubclass(w.category, PrecisionWarning) for w in caught)
        assert error <= 1e-2 or (flagged and rat.diagnostics.precision >= error), solver


# -- 4. never a non-finite result ---------------------------------------------------------------
def test_float16_overflowing_direction_is_natgrads_error():
    torch.manual_seed(0)
    policy = Gaussian().half()
    obs, acts = torch.randn(64, 4).half(), torch.randn(64, 2).half()
    rat = RATNaturalGradient(damping=1e-1, solver="cholesky")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        with pytest.raises(NonFiniteError, match="overflows float16"):
            rat.natural_gradient(policy, obs, acts, 1e6 * torch.randn(64))
        with pytest.raises(NonFiniteError, match="A~"):
            rat(policy, obs, acts, torch.full((64,), 6e4).half())


def test_float64_overflow_of_a_tilde_is_natgrads_error():
    policy = Gaussian().double()  # P = 60 < N: K has a null space, where A~ = A / damping
    obs, acts = torch.randn(128, 4, dtype=D), torch.randn(128, 2, dtype=D)
    adv = torch.full((128,), 1e300, dtype=D)
    with pytest.raises(NonFiniteError, match="A~"):
        RATNaturalGradient(damping=1e-12, solver="cholesky")(policy, obs, acts, adv)


# -- 5. natgrad's own errors, nothing mutated ---------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "log_std", "damping"), [(torch.float64, -20.0, 1e-2), (torch.float32, 0.0, 1e-12)]
)
@pytest.mark.parametrize("solver", ["auto", "cholesky", "kaczmarz", "cg"])
def test_ill_conditioned_systems_raise_natgrads_error(dtype, log_std, damping, solver):
    torch.manual_seed(0)
    policy = Gaussian(log_std=log_std).to(dtype)
    obs = torch.randn(64, 4, dtype=dtype)
    with torch.no_grad():
        acts = policy.mean(obs) + torch.randn(64, 2, dtype=dtype) * policy.log_std.exp()
    with pytest.raises(IllConditionedError, match="damping >="):
        RATNaturalGradient(damping=damping, solver=solver)(
            policy, obs, acts, torch.randn(64, dtype=dtype)
        )


class RunningNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, obs):
        if self.training:
            with torch.no_grad():
                self.count += obs.shape[0]
                self.mean += (obs.mean(0) - self.mean) * obs.shape[0] / self.count
        return torch.distributions.Categorical(logits=self.linear(obs - self.mean))


def test_buffer_mutating_policy_is_refused_and_restored():
    policy = RunningNorm()
    before = copy.deepcopy(policy.state_dict())
    obs, acts, adv = torch.randn(48, 4), torch.randint(0, 3, (48,)), torch.randn(48)
    with pytest.raises(PolicyMutationError, match=r"policy\.count.*eval\(\)"):
        RATNaturalGradient(damping=1e-2)(policy, obs, acts, adv)
    for name, value in policy.state_dict().items():
        assert torch.equal(value, before[name]), name
    policy.eval()  # the documented fix works
    RATNaturalGradient(damping=1e-2)(policy, obs, acts, adv)
    assert float(policy.count) == 0.0


def test_model_mutating_buffer_is_refused_in_supervised_api():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.linear(x)

    model = Counting()
    with pytest.raises(PolicyMutationError, match="model.calls"):
        SupervisedNaturalGradient("mse", 1e-2)(model, torch.randn(8, 3), torch.randn(8, 2))
    assert float(model.calls) == 0.0


def test_batch_statistics_on_one_sample_is_natgrads_error():
    class Normalizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, obs):
            return torch.distributions.Categorical(
                logits=self.linear((obs - obs.mean(0)) / obs.std(0))
            )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own std() warning
        # Depending on whether the distribution validates its arguments inside vmap, the
        # one-sample evaluation either fails or returns NaN: both are this error.
        with pytest.raises(SampleCouplingError, match="single sample|differ from the batched"):
            RATNaturalGradient(damping=1e-2)(
                Normalizing(), torch.randn(48, 4), torch.randint(0, 3, (48,)), torch.randn(48)
            )


def test_nan_in_obs_names_the_leaf_and_sample():
    policy = Gaussian()
    obs, acts, adv = torch.randn(16, 4), torch.randn(16, 2), torch.randn(16)
    obs[5, 2] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"obs contains NaN or inf in 1 sample\(s\) \(first: sample 5\)"
    ):
        RATNaturalGradient(damping=1e-2)(policy, obs, acts, adv)
    acts[3, 0] = float("inf")
    obs[5, 2] = 0.0
    with pytest.raises(NonFiniteError, match="acts contains NaN or inf"):
        RATNaturalGradient(damping=1e-2)(policy, obs, acts, adv)


def test_nan_parameter_is_named():
    policy = Gaussian()
    with torch.no_grad():
        policy.mean[2].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"policy\.mean\.2\.bias"):
        RATNaturalGradient(damping=1e-2)(
            policy, torch.randn(8, 4), torch.randn(8, 2), torch.randn(8)
        )


# -- 8. minor ----------------------------------------------------------------------------------
def test_kaczmarz_reports_its_true_residual_at_tiny_damping():
    torch.manual_seed(0)
    policy = Gaussian().double()
    obs, acts, adv = (
        torch.randn(48, 4, dtype=D),
        torch.randn(48, 2, dtype=D),
        torch.randn(48, dtype=D),
    )
    _, scores = reference_direction(policy, obs, acts, adv, 1e-13)
    rat = RATNaturalGradient(
        damping=1e-13,
        solver="kaczmarz",
        block_size=8,
        max_epochs=5,
        seed=0,
        on_nonconvergence="warn",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a_tilde = rat(policy, obs, acts, adv)
    n = scores.shape[0]
    true = torch.linalg.vector_norm(adv - scores @ (scores.T @ a_tilde) / n - 1e-13 * a_tilde)
    true_relative = float(true / torch.linalg.vector_norm(adv))
    assert rat.diagnostics.residual == pytest.approx(true_relative, rel=1e-3, abs=1e-12)


def test_streaming_with_tiny_blocks_is_not_quadratic():
    torch.manual_seed(0)
    policy = Gaussian()
    n = 256
    obs, acts, adv = torch.randn(n, 4), torch.randn(n, 2), torch.randn(n)
    rat = RATNaturalGradient(damping=1e-1, solver="cholesky", block_size=1, backend="streaming")
    start = time.perf_counter()
    rat(policy, obs, acts, adv)
    # Whole-matrix passes use memory-budget chunks, not blocks of one sample (was ~30 s).
    assert time.perf_counter() - start < 10.0


def test_numpy_scalars_are_accepted():
    rat = RATNaturalGradient(
        damping=np.float32(1e-2), block_size=np.int64(8), tol=np.float64(1e-3), seed=np.int64(3)
    )
    assert isinstance(rat.damping, float) and isinstance(rat.block_size, int)
    rat(Gaussian(), torch.randn(16, 4), torch.randn(16, 2), torch.randn(16))
    with pytest.raises(TypeError, match="damping"):
        RATNaturalGradient(damping=np.bool_(True))


def test_a_policy_whose_parameters_mix_dtypes_is_refused():
    """One dtype per policy: a float32 ``log_std`` beside float64 layers is natgrad's
    TypeError (naming the dtypes), whichever parameter comes first."""
    from torch.distributions import Normal

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = nn.Linear(3, 2).double()
            self.log_std = nn.Parameter(torch.zeros(2))  # float32

        def forward(self, obs):
            mean = self.mean(obs)
            return Normal(mean, self.log_std.exp().expand_as(mean))

    policy = Mixed()
    obs = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        acts = policy(obs).sample()
    for fisher in ("sampled", "expected"):
        with pytest.raises(TypeError, match="float32"):
            RATNaturalGradient(damping=0.1, fisher=fisher).natural_gradient(
                policy, obs, acts, torch.randn(8, dtype=torch.float64)
            )
