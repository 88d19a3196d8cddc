"""Hostile inputs over the public API: correct, honestly flagged, or natgrad's own error.

The property checked everywhere: the answer matches the dense float64 reference to the
precision the dtype allows (``tol`` for a converged iterative solve plus the rounding that
``diagnostics.precision`` reports), or the diagnostics say it does not, or natgrad raises
one of its own errors -- never a non-finite result, never a raw torch error, never a
changed policy.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import dense_natural_gradient, dense_scores, reference_log_prob
from torch import nn

from natgrad import NatgradError, NonFiniteError, RATNaturalGradient, UnderflowError
from natgrad.supervised import SupervisedNaturalGradient

D = torch.float64
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(D) for t in tensors])


class Gaussian(nn.Module):
    def __init__(self):
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
        self.log_std = nn.Parameter(torch.zeros(2))

    def forward(self, obs):
        return torch.distributions.Normal(self.mean(obs), self.log_std.exp())


class TiedCategorical(nn.Module):
    """Two layers sharing one weight (weight tying)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 3)

    def forward(self, obs):
        return torch.distributions.Categorical(logits=self.head(torch.tanh(self.b(self.a(obs)))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, obs):
        hidden = torch.relu(self.norm(self.conv(obs)))
        return torch.distributions.Categorical(logits=self.head(hidden.flatten(1)))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)
    assert all(p.grad is None for p in module.parameters()), ".grad was touched"


def reference(policy, obs, acts, adv, damping):
    policy = copy.deepcopy(policy).double()
    cast = lambda t: t.detach().double() if t.is_floating_point() else t  # noqa: E731
    params = list(policy.parameters())
    scores = dense_scores(policy, reference_log_prob, cast(obs), cast(acts), params, adv.shape[0])
    return dense_natural_gradient(scores, adv.detach().double(), damping)


def check_property(rat, policy, obs, acts, adv):
    """Run ``rat`` and check the property; returns the outcome for reporting."""
    before = snapshot(policy)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PrecisionWarning / NotConvergedWarning: flags
            result = rat.natural_gradient(policy, obs, acts, adv)
    except NatgradError:
        assert_unchanged(policy, before)
        return "refused"
    assert_unchanged(policy, before)
    d = rat.diagnostics
    direction = flat(result.direction)
    assert bool(torch.isfinite(direction).all()) and bool(torch.isfinite(result.advantages).all())
    assert result.advantages.dtype == adv.dtype and result.advantages.shape == adv.shape
    expected = reference(policy, obs, acts, adv, rat.damping)
    size = float(torch.linalg.vector_norm(expected))
    error = float(torch.linalg.vector_norm(direction - expected)) / max(size, 1e-300)
    dtype = next(policy.parameters()).dtype
    allowed = (
        (rat.tol if d.solver != "cholesky" else 0.0)
        + 10 * d.precision
        + 16 * torch.finfo(dtype).eps  # the direction is returned in the policy's dtype
    )
    if d.converged and size > 0:
        assert error <= allowed, f"error {error:.3g} > allowed {allowed:.3g} ({d})"
    return "answered"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 80),
    scale_exponent=st.integers(-300, 300),
    damping_exponent=st.floats(-12, 6),
    solver=st.sampled_from(["auto", "cg", "kaczmarz", "cholesky"]),
    duplicated=st.booleans(),
    layout=st.sampled_from(["contiguous", "strided", "requires_grad"]),
    seed=st.integers(0, 2**16),
)
def test_any_scale_dtype_size_and_damping(
    dtype, n, scale_exponent, damping_exponent, solver, duplicated, layout, seed
):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    policy = Gaussian().to(dtype)
    obs = torch.randn(n, 6 if layout == "strided" else 3, generator=gen)
    obs = obs[:, ::2] if layout == "strided" else obs
    if duplicated:  # rank-deficient: every sample twice
        obs = torch.cat([obs[: (n + 1) // 2]] * 2)[:n]
    obs = obs.to(dtype).requires_grad_(layout == "requires_grad")
    acts = torch.randn(n, 2, generator=gen).to(dtype)
    adv = torch.randn(n, generator=gen, dtype=D) * 10.0**scale_exponent
    rat = RATNaturalGradient(
        damping=10.0**damping_exponent,
        solver=solver,
        seed=seed,
        tol=1e-6,
        max_epochs=200,
        block_size=16,
        on_nonconvergence="warn",
    )
    check_property(rat, policy, obs, acts, adv)
    assert obs.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", ["auto", "cg", "kaczmarz", "cholesky"])
def test_hostile_architectures(dtype, solver):
    torch.manual_seed(0)
    rat = lambda: RATNaturalGradient(  # noqa: E731
        damping=1e-2,
        solver=solver,
        seed=0,
        tol=1e-6,
        max_epochs=300,
        block_size=8,
        on_nonconvergence="warn",
    )
    tied = TiedCategorical().to(dtype)
    obs = torch.randn(24, 5).to(dtype)
    check_property(rat(), tied, obs, torch.randint(0, 3, (24,)), torch.randn(24, dtype=D))
    cnn = SmallCNN().to(dtype).eval()  # BatchNorm running statistics as buffers
    images = torch.randn(24, 2, 5, 5).to(dtype).to(memory_format=torch.channels_last)
    check_property(rat(), cnn, images, torch.randint(0, 4, (24,)), torch.randn(24, dtype=D))


class WithUnusedParameter(Gaussian):
    """A parameter the log-probabilities do not depend on: its scores are all zero."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["materialized", "streaming"])
@pytest.mark.parametrize("solver", ["kaczmarz", "accelerated_kaczmarz", "cg", "cholesky"])
def test_all_zero_scores_give_a_over_damping_converged(solver, backend, dtype):
    """J = 0: (lam I) A~ = A, so A~ = A / lam and d = 0 exactly. The iterative solvers used
    to run to max_epochs/max_iters and report an infinite direction-error bound (relative
    to |d| = 0), i.e. not converged (raised here with on_nonconvergence="raise")."""
    torch.manual_seed(0)
    policy = WithUnusedParameter().to(dtype)
    obs, acts = torch.randn(24, 3, dtype=dtype), torch.randn(24, 2, dtype=dtype)
    adv = 3 * torch.randn(24, dtype=dtype)
    rat = RATNaturalGradient(
        damping=0.1, solver=solver, backend=backend, seed=0, tol=1e-6, on_nonconvergence="raise"
    )
    result = rat.natural_gradient(policy, obs, acts, adv, [policy.unused])
    expected = (adv.to(D) / 0.1).to(dtype)
    torch.testing.assert_close(result.advantages, expected, rtol=2 * torch.finfo(dtype).eps, atol=0)
    assert torch.count_nonzero(result.direction[0]) == 0
    assert result.g_dot_d == 0.0 and result.d_fisher_d == 0.0
    diag = rat.diagnostics
    assert diag.converged and diag.solver == solver and not diag.fallbacks[1:]
    assert diag.residual <= 4 * torch.finfo(D).eps
    assert diag.direction_error == (None if solver == "cholesky" else 0.0)
    assert diag.condition == 1.0 and diag.precision < 1e-6
    if solver != "cholesky":
        assert diag.iterations == 0 and "every score (row of J) is zero" in diag.fallbacks[0]


@pytest.mark.parametrize("fisher", ["sampled", "expected"])
def test_step_terms_scale_with_the_advantages_or_are_refused(fisher):
    """g^T d and d^T F d are quadratic in A: at |A| ~ 1e20 (~1e40, beyond float32 but well
    inside float64) they used to be refused as an "overflow" by a float32 check, and at
    |A| ~ 1e-200 d^T F d underflowed to 0, so step_size() silently returned 0."""
    torch.manual_seed(0)
    policy = Gaussian().double()
    obs, acts, adv = (
        torch.randn(16, 3, dtype=D),
        torch.randn(16, 2, dtype=D),
        torch.randn(16, dtype=D),
    )
    rat = lambda: RATNaturalGradient(damping=1e-2, solver="cholesky", fisher=fisher)  # noqa: E731
    base = rat().natural_gradient(policy, obs, acts, adv)
    big = rat().natural_gradient(policy, obs, acts, adv * 1e20)
    assert big.g_dot_d == pytest.approx(base.g_dot_d * 1e40, rel=1e-10)
    assert big.d_fisher_d == pytest.approx(base.d_fisher_d * 1e40, rel=1e-10)
    assert big.step_size(0.01) == pytest.approx(base.step_size(0.01) * 1e-20, rel=1e-10)
    with pytest.raises(NonFiniteError, match=r"overflow float64; scale the advantages down"):
        rat().natural_gradient(policy, obs, acts, adv * 1e160)
    with pytest.raises(UnderflowError, match=r"d\^T F d = 0 underflows float64"):
        rat().natural_gradient(policy, obs, acts, adv * 1e-200)


@pytest.mark.parametrize("where", ["obs", "acts", "adv", "parameter", "buffer"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_anywhere_is_natgrads_error(where, value):
    policy = SmallCNN().eval()
    obs, acts, adv = torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,)), torch.randn(8)
    with torch.no_grad():
        if where == "obs":
            obs[3, 1, 2, 2] = value
        elif where == "adv":
            adv[2] = value
        elif where == "parameter":
            policy.conv.weight[0, 0, 0, 0] = value
        elif where == "buffer":
            policy.norm.running_var[1] = value
    if where == "acts":
        policy, obs, acts = Gaussian(), torch.randn(8, 3), torch.randn(8, 2)
        acts[1, 1] = value
    before = snapshot(policy)
    named = {"parameter": r"policy\.conv\.weight", "buffer": r"policy\.norm\.running_var"}
    with pytest.raises(NatgradError, match=named.get(where, where)):
        RATNaturalGradient(damping=1e-2)(policy, obs, acts, adv)
    assert_unchanged(policy, before)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    n=st.integers(1, 48),
    loss=st.sampled_from(["mse", "cross_entropy"]),
    logit_scale=st.sampled_from([1.0, 30.0]),
    damping_exponent=st.floats(-8, 2),
    solver=st.sampled_from(["cg", "kaczmarz", "cholesky"]),
    seed=st.integers(0, 2**16),
)
def test_supervised_correct_flagged_or_refused(
    dtype, n, loss, logit_scale, damping_exponent, solver, seed
):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    with torch.no_grad():
        model[2].weight.mul_(logit_scale)  # confident (and confidently wrong) predictions
    x = torch.randn(n, 3, dtype=dtype)
    y = torch.randint(0, 4, (n,)) if loss == "cross_entropy" else torch.randn(n, 4, dtype=dtype)
    options = dict(solver=solver, tol=1e-6, seed=0, max_epochs=300, on_nonconvergence="warn")
    damping = 10.0**damping_exponent
    before = snapshot(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = SupervisedNaturalGradient(loss, damping, **options)(model, x, y)
            exact = SupervisedNaturalGradient(loss, damping, solver="cholesky")(
                copy.deepcopy(model).double(), x.double(), y.double() if loss == "mse" else y
            )
    except NatgradError:
        assert_unchanged(model, before)
        return
    assert_unchanged(model, before)
    direction, expected = flat(result.direction), flat(exact.direction)
    assert bool(torch.isfinite(direction).all())
    d = result.diagnostics
    if d.converged and float(torch.linalg.vector_norm(expected)) > 0:
        error = float(
            torch.linalg.vector_norm(direction - expected) / torch.linalg.vector_norm(expected)
        )
        allowed = (
            (1e-6 if solver != "cholesky" else 0.0) + 10 * d.precision + 16 * torch.finfo(dtype).eps
        )
        assert error <= allowed, f"error {error:.3g} > {allowed:.3g} ({d})"
