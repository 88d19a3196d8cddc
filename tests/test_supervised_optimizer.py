"""NaturalGradientOptimizer: the step it takes, its damping schedules and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from natgrad.supervised import NaturalGradientOptimizer, SupervisedNaturalGradient

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


class Cubic(nn.Module):
    """f(x) = (x w)^3: the Gauss-Newton model badly underestimates the curvature far out."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))

    def forward(self, x):
        return (x * self.w).pow(3)


def linear_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([[1.5], [-2.0]], dtype=torch.float64) + 0.3
    torch.manual_seed(0)
    return nn.Linear(2, 1).double(), x, y


def test_step_is_minus_lr_times_direction_and_grads_are_restored():
    model, x, y = linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    expected = SupervisedNaturalGradient("mse", 1e-2, solver="cholesky")(model, x, y).direction
    model.weight.grad = torch.full_like(model.weight, 7.0)
    opt = NaturalGradientOptimizer(model, lr=0.5, damping=1e-2, solver="cholesky")
    info = opt.step(x, y)
    for p, b, d in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.5 * d, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 7.0))
    assert model.bias.grad is None
    assert info.damping == info.next_damping == 1e-2
    assert info.reduction_ratio is None and info.loss_after is None


def test_full_gauss_newton_step_solves_linear_least_squares():
    model, x, y = linear_problem()
    opt = NaturalGradientOptimizer(model, lr=1.0, damping=1e-10, solver="cholesky")
    first = opt.step(x, y)
    second = opt.step(x, y)
    assert first.loss > 1.0 and second.loss < 1e-12


def test_levenberg_marquardt_decreases_damping_when_the_model_is_exact():
    model, x, y = linear_problem()  # mse of a linear model: the quadratic model is exact
    opt = NaturalGradientOptimizer(
        model,
        damping=1e-2,
        damping_schedule="levenberg_marquardt",
        solver="cholesky",
        lm_factor=2.0,
    )
    info = opt.step(x, y)
    assert info.reduction_ratio == pytest.approx(1.0, abs=1e-9)
    assert info.next_damping == opt.damping == pytest.approx(5e-3)
    assert info.loss_after < info.loss
    assert info.loss_after - info.loss == pytest.approx(info.predicted_change, rel=1e-9)


def test_levenberg_marquardt_increases_damping_when_the_ratio_is_poor():
    model = Cubic()
    x, y = torch.ones(4, 1, dtype=torch.float64), torch.full((4, 1), 8.0, dtype=torch.float64)
    opt = NaturalGradientOptimizer(
        model,
        damping=1e-6,
        damping_schedule="levenberg_marquardt",
        solver="cholesky",
        max_damping=1e-5,
    )
    first = opt.step(x, y)
    assert first.reduction_ratio < 0.25  # the step overshoots: the loss grows
    assert first.next_damping == pytest.approx(1.5e-6)
    dampings = [opt.step(x, y).next_damping for _ in range(6)]
    assert dampings[-1] <= 1e-5  # clamped at max_damping


def test_levenberg_marquardt_increases_damping_when_an_unpredicted_rise_happens():
    """lr=3 on an exact quadratic: the update predicts a rise (no ratio), and the loss rises.

    The damping was left unchanged, so LM kept taking steps that raised the loss.
    """
    model, x, y = linear_problem()
    opt = NaturalGradientOptimizer(
        model,
        lr=3.0,
        damping=1e-2,
        damping_schedule="levenberg_marquardt",
        solver="cholesky",
        lm_factor=2.0,
    )
    info = opt.step(x, y)
    assert info.predicted_change > 0 and info.reduction_ratio is None
    assert info.loss_after > info.loss
    assert info.next_damping == opt.damping == pytest.approx(2e-2)


def test_levenberg_marquardt_damping_is_clamped_to_min_damping():
    """An exact quadratic model divides lam by lm_factor (1e-2 -> 5e-3), clamped at 8e-3."""
    model, x, y = linear_problem()
    opt = NaturalGradientOptimizer(
        model,
        damping=1e-2,
        damping_schedule="levenberg_marquardt",
        solver="cholesky",
        lm_factor=2.0,
        min_damping=8e-3,
    )
    info = opt.step(x, y)
    assert info.reduction_ratio > 0.75  # would divide lam by 2 ...
    assert info.next_damping == opt.damping == 8e-3  # ... but not below min_damping


def test_levenberg_marquardt_damping_is_clamped_to_max_damping():
    """A poor ratio multiplies lam by lm_factor (1e-6 -> 1.5e-6), clamped at 1.2e-6."""
    model = Cubic()
    x, y = torch.ones(4, 1, dtype=torch.float64), torch.full((4, 1), 8.0, dtype=torch.float64)
    opt = NaturalGradientOptimizer(
        model,
        damping=1e-6,
        damping_schedule="levenberg_marquardt",
        solver="cholesky",
        max_damping=1.2e-6,
    )
    info = opt.step(x, y)
    assert info.reduction_ratio < 0.25  # would multiply lam by 1.5 ...
    assert info.next_damping == opt.damping == 1.2e-6  # ... but not above max_damping


def test_callable_schedule_and_momentum_base_optimizer():
    model, x, y = linear_problem()
    used = []
    opt = NaturalGradientOptimizer(
        model,
        damping=1.0,
        damping_schedule=lambda step: 0.1 / (1 + step),
        solver="cholesky",
        lr=0.5,
        momentum=0.9,
    )
    for _ in range(3):
        used.append(opt.step(x, y).damping)
    assert used == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert opt.base_optimizer.param_groups[0]["momentum"] == 0.9


def test_custom_base_optimizer_and_parameter_subset():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    head = list(model[2].parameters())
    frozen = [p.detach().clone() for p in model[0].parameters()]
    base = torch.optim.Adam(head, lr=1e-2)
    opt = NaturalGradientOptimizer(
        model,
        loss="cross_entropy",
        params=head,
        base_optimizer=base,
        fisher="sampled",
        seed=0,
        damping=1e-2,
    )
    losses = [opt.step(x, y).loss for _ in range(5)]
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"damping_schedule": "cosine"},
            ValueError,
            "damping_schedule must be one of 'fixed', 'levenberg_marquardt'",
        ),
        ({"lr": 0.0}, ValueError, "lr must be a finite float > 0"),
        ({"momentum": 1.0}, ValueError, r"momentum must be a float in \[0, 1\)"),
        ({"lm_factor": 0.5}, ValueError, "lm_factor must be > 1"),
        ({"min_damping": 1.0, "max_damping": 0.1}, ValueError, "exceeds max_damping"),
        ({"base_optimizer": "sgd"}, TypeError, "base_optimizer must be a torch.optim.Optimizer"),
        (
            {"base_optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)},
            ValueError,
            "not among the trained params",
        ),
        ({"loss": "hinge"}, ValueError, "loss must be one of"),
        ({"tol": 1.0}, ValueError, r"tol must be a float in \(0, 1\), got 1.0"),
    ],
)
def test_misuse(kwargs, error, pattern):
    model, _, _ = linear_problem()
    with pytest.raises(error, match=pattern):
        NaturalGradientOptimizer(model, **kwargs)


def test_bad_callable_schedule_value_is_reported_at_the_step():
    model, x, y = linear_problem()
    opt = NaturalGradientOptimizer(model, damping_schedule=lambda step: -1.0)
    with pytest.raises(ValueError, match=r"damping_schedule\(step\) must be a finite float > 0"):
        opt.step(x, y)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_scheduled_damping_is_the_damping_solved_with(solver):
    """A damping schedule changes the damping of the solve itself, not only the recovery."""
    model, x, y = linear_problem()
    scheduled = 0.7
    expected = SupervisedNaturalGradient("mse", scheduled, solver=solver, tol=1e-12)(
        model, x, y
    ).direction
    before = [p.detach().clone() for p in model.parameters()]
    opt = NaturalGradientOptimizer(
        model, lr=1.0, damping=1e-3, damping_schedule=lambda step: scheduled, solver=solver,
        tol=1e-12,
    )  # fmt: skip
    opt.step(x, y)
    for p, p0, d in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(p.detach(), p0 - d, rtol=1e-9, atol=1e-12)


def test_directions_follow_the_order_of_params_and_duplicates_are_refused():
    from natgrad import ArgumentError
    from natgrad.supervised import natural_gradient

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    exact = {"solver": "cholesky"}
    swapped = natural_gradient(model, x, y, params=[model[2].weight, model[0].weight], **exact)
    in_order = natural_gradient(model, x, y, params=[model[0].weight, model[2].weight], **exact)
    assert swapped[0].shape == model[2].weight.shape  # 4x4 both: shapes cannot tell them apart
    assert torch.allclose(swapped[0], in_order[1], rtol=1e-10, atol=1e-12)
    assert torch.allclose(swapped[1], in_order[0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(in_order[0], in_order[1])
    with pytest.raises(ArgumentError, match=r"params\[1\] \(0.weight\) is params\[0\] again"):
        natural_gradient(model, x, y, params=[model[0].weight, model[0].weight])


def test_a_step_that_raises_is_undone():
    from natgrad import NatgradError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    opt = NaturalGradientOptimizer(
        model, damping_schedule=lambda step: 1e-2 if step == 0 else 0.0, momentum=0.9
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NatgradError, match=r"damping_schedule\(step\).* at step 1"):
        opt.step(x, y)
    assert opt.steps == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(not s for s in opt.base_optimizer.state.values())  # no momentum left


def test_levenberg_marquardt_refuses_a_start_outside_its_range():
    from natgrad import ArgumentError

    model = nn.Linear(3, 1)
    with pytest.raises(ArgumentError, match=r"damping=1000000.0 lies outside"):
        NaturalGradientOptimizer(model, damping=1e6, damping_schedule="levenberg_marquardt")


def _resumable_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    opt = NaturalGradientOptimizer(
        model,
        "cross_entropy",
        lr=0.5,
        momentum=0.9,
        damping=1e-2,
        damping_schedule="levenberg_marquardt",
        fisher="sampled",
        solver="kaczmarz",
        block_size=8,
        seed=0,
    )
    return model, opt, x, y


def test_state_dict_resumes_damping_steps_targets_and_momentum_exactly():
    """There was no state_dict: a resumed run restarted LM's damping, the step counter of a
    callable schedule, the sampled targets' generator and (unless saved apart) momentum."""
    model, opt, x, y = _resumable_run()
    for _ in range(3):
        opt.step(x, y)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    expected = [opt.step(x, y) for _ in range(2)]
    expected_params = [p.detach().clone() for p in model.parameters()]

    model, opt, x, y = _resumable_run()
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved)
    assert opt.steps == 3 and opt.damping == saved["damping"]
    got = [opt.step(x, y) for _ in range(2)]
    assert [i.damping for i in got] == [i.damping for i in expected]
    assert [i.loss for i in got] == [i.loss for i in expected]
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected_params, strict=True))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda s: s.pop("damping"), r"state lacks damping"),
        (lambda s: s.update(steps=-1), r"state\['steps'\] must be an int >= 0"),
        (lambda s: s.update(damping=float("nan")), r"state\['damping'\] must be a finite"),
        (lambda s: s.update(generator=[1, 2]), r"state\['generator'\] must be"),
    ],
)
def test_load_state_dict_refuses_a_crafted_state_before_changing_anything(change, pattern):
    from natgrad import NatgradError

    model, opt, x, y = _resumable_run()
    opt.step(x, y)
    state = copy.deepcopy(opt.state_dict())
    change(state)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(NatgradError, match=pattern):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert (after["steps"], after["damping"]) == (before["steps"], before["damping"])
    assert torch.equal(after["generator"], before["generator"])
