"""Exactness of natgrad.supervised.natural_gradient against a dense float64 reference.

The reference takes per-sample output Jacobians one sample and one output at a time with
plain ``torch.autograd``, builds ``F`` (P x P) from the definitions of the issue and solves
``(F + lam I) d = g`` densely, with ``g`` from ``backward()`` of the batched mean loss.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from natgrad import (
    ArgumentError,
    ArgumentTypeError,
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    PolicyMutationError,
    PrecisionWarning,
)
from natgrad.supervised import SupervisedNaturalGradient, mean_loss, natural_gradient

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

N = 12
SOLVERS = {
    "cholesky": {},
    "cg": {"max_iters": 2000},
    "kaczmarz": {"block_size": 8, "max_epochs": 3000},
}


# -- models ------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, outputs: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, outputs))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, outputs: int = 3):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten())
        self.head = nn.Linear(3 * 3 * 3, outputs)

    def forward(self, x):
        return self.head(self.conv(x))


class ItemModel(MLP):
    """``.item()`` in forward: vmap cannot batch it, so Jacobians fall back to a loop."""

    def forward(self, x):
        scale = 1.0 + 0.0 * float(x.abs().sum().item())
        return self.net(x) * scale


MODELS = {
    "mlp": (MLP, lambda gen: torch.randn(N, 4, generator=gen, dtype=torch.float64)),
    "cnn": (CNN, lambda gen: torch.randn(N, 2, 5, 5, generator=gen, dtype=torch.float64)),
}


def build(name: str, loss: str, outputs: int = 3):
    make_model, make_inputs = MODELS[name]
    torch.manual_seed(0)
    model = make_model(outputs).double()
    gen = torch.Generator().manual_seed(1)
    inputs = make_inputs(gen)
    if loss == "mse":
        targets = torch.randn(N, outputs, generator=gen, dtype=torch.float64)
    else:
        targets = torch.randint(0, outputs, (N,), generator=gen)
    return model, inputs, targets


# -- the independent dense reference -----------------------------------------------------
def dense_jacobians(model: nn.Module, inputs: Tensor, params: list[Tensor]) -> Tensor:
    """(N, k, P): one autograd.grad per sample and output."""
    rows = []
    for i in range(inputs.shape[0]):
        out = model(inputs[i : i + 1]).reshape(-1)
        per_output = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            per_output.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(grads, params, strict=True)
                    ]
                )
            )
        rows.append(torch.stack(per_output))
    return torch.stack(rows).to(torch.float64)


def dense_gradient(model, inputs, targets, loss, params) -> Tensor:
    out = model(inputs)
    if loss == "mse":
        value = 0.5 * (out - targets).pow(2).sum(dim=1).mean()
    else:
        value = nn.functional.cross_entropy(out, targets)
    grads = torch.autograd.grad(value, params)
    return torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)


def dense_fisher(model, inputs, loss, fisher, params, sampled) -> Tensor:
    jac = dense_jacobians(model, inputs, params)
    with torch.no_grad():
        out = model(inputs).to(torch.float64)
    n = jac.shape[0]
    if fisher == "sampled":
        if loss == "mse":
            weights = sampled.to(torch.float64) - out
        else:
            p = torch.softmax(out, dim=1)
            weights = nn.functional.one_hot(sampled, out.shape[1]).to(torch.float64) - p
        scores = torch.einsum("nkp,nk->np", jac, weights)
        return scores.T @ scores / n
    if loss == "mse":
        return torch.einsum("nkp,nkq->pq", jac, jac) / n
    p = torch.softmax(out, dim=1)
    middle = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nkp,nkl,nlq->pq", jac, middle, jac) / n


def dense_direction(model, inputs, targets, loss, fisher, damping, params, sampled=None):
    matrix = dense_fisher(model, inputs, loss, fisher, params, sampled)
    g = dense_gradient(model, inputs, targets, loss, params)
    matrix = matrix + damping * torch.eye(matrix.shape[0], dtype=torch.float64)
    return torch.linalg.solve(matrix, g), g, matrix


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).to(torch.float64)


def relative_error(got: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected))


# -- exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("fisher", ["exact", "sampled"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_direction_matches_dense_reference(model_name, loss, fisher, solver):
    model, inputs, targets = build(model_name, loss)
    params = list(model.parameters())
    for damping in (1e-1, 1e-2) if solver == "kaczmarz" else (1e-1, 1e-3):
        transform = SupervisedNaturalGradient(
            loss,
            damping,
            fisher,
            solver,
            tol=1e-12,
            seed=3,
            on_nonconvergence="raise",
            **SOLVERS[solver],
        )
        result = transform(model, inputs, targets)
        expected, g, matrix = dense_direction(
            model, inputs, targets, loss, fisher, damping, params, result.sampled_targets
        )
        d = flat(result.direction)
        assert relative_error(d, expected) <= 1e-8
        assert relative_error(flat(result.gradient), g) <= 1e-10
        assert result.form == ("kernel" if fisher == "exact" else "push_through")
        assert result.g_dot_d == pytest.approx(float(g @ expected), rel=1e-8)
        fisher_only = matrix - damping * torch.eye(matrix.shape[0], dtype=torch.float64)
        assert result.d_fisher_d == pytest.approx(
            float(expected @ fisher_only @ expected), rel=1e-7
        )
        assert result.diagnostics.converged
        assert result.diagnostics.solver == solver  # no fallback answered for it
        # Only notes on the rounding limit of tol=1e-12 (PrecisionWarning) are allowed.
        assert [f for f in result.diagnostics.fallbacks if not f.startswith("cond(")] == []


def test_functional_form_equals_object_and_seed_reproduces_sampled_targets():
    model, inputs, targets = build("mlp", "cross_entropy")
    kwargs = {"loss": "cross_entropy", "fisher": "sampled", "solver": "cholesky", "seed": 7}
    first = natural_gradient(model, inputs, targets, damping=1e-2, **kwargs)
    second = natural_gradient(model, inputs, targets, damping=1e-2, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    result = SupervisedNaturalGradient(damping=1e-2, **kwargs)(model, inputs, targets)
    assert all(torch.equal(a, b) for a, b in zip(first, result.direction, strict=True))
    # The labels are multinomial draws from softmax(f(x)) by a generator seeded with `seed`.
    probs = torch.softmax(model(inputs).detach(), dim=1)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    assert torch.equal(result.sampled_targets, labels)
    other = natural_gradient(model, inputs, targets, damping=1e-2, **{**kwargs, "seed": 8})
    assert not torch.equal(flat(first), flat(other))


def test_parameter_subset_and_shapes():
    model, inputs, targets = build("cnn", "mse")
    params = list(model.head.parameters())
    d = natural_gradient(model, inputs, targets, damping=1e-3, solver="cholesky", params=params)
    assert [t.shape for t in d] == [p.shape for p in params]
    expected, _, _ = dense_direction(model, inputs, targets, "mse", "exact", 1e-3, params)
    assert relative_error(flat(d), expected) <= 1e-8


def test_scalar_regression_output_shape_n():
    """A model returning shape (N,) with targets (N,) is one output per sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0)).double()
    inputs, targets = torch.randn(N, 4, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    d = natural_gradient(model, inputs, targets, damping=1e-2, solver="cholesky")
    params = list(model.parameters())
    jac = dense_jacobians(lambda x: model(x)[:, None], inputs, params)
    fisher = torch.einsum("nkp,nkq->pq", jac, jac) / N + 1e-2 * torch.eye(
        jac.shape[2], dtype=torch.float64
    )
    residual = (model(inputs) - targets).detach()
    g = torch.einsum("nkp,n->p", jac, residual) / N
    assert relative_error(flat(d), torch.linalg.solve(fisher, g)) <= 1e-8


def test_underflowing_class_probability_uses_push_through_exactly():
    model, inputs, targets = build("mlp", "cross_entropy")
    with torch.no_grad():
        model.net[2].weight.mul_(3000.0)  # log p_y far below -1400 for some samples
    transform = SupervisedNaturalGradient("cross_entropy", 1e-1, "exact", "cholesky")
    result = transform(model, inputs, targets)
    assert result.form == "push_through"
    expected, _, _ = dense_direction(
        model, inputs, targets, "cross_entropy", "exact", 1e-1, list(model.parameters())
    )
    assert relative_error(flat(result.direction), expected) <= 1e-8


def test_vmap_limitation_falls_back_to_loop():
    torch.manual_seed(0)
    model = ItemModel().double()
    inputs = torch.randn(N, 4, dtype=torch.float64)
    targets = torch.randn(N, 3, dtype=torch.float64)
    transform = SupervisedNaturalGradient("mse", 1e-2, solver="cholesky")
    result = transform(model, inputs, targets)
    assert result.diagnostics.score_path == "loop"
    assert any("one sample at a time" in note for note in result.diagnostics.fallbacks)
    expected, _, _ = dense_direction(
        model, inputs, targets, "mse", "exact", 1e-2, list(model.parameters())
    )
    assert relative_error(flat(result.direction), expected) <= 1e-8


class LegacySquare(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func can differentiate it neither
    batched nor one sample at a time."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return 2 * z * grad


class LegacyFunctionModel(MLP):
    def forward(self, x):
        return LegacySquare.apply(self.net(x))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_a_model_torch_func_cannot_differentiate_per_sample_is_natgrads_error(loss):
    """The loop fallback used to end in torch's raw RuntimeError from inside jacrev."""
    torch.manual_seed(0)
    model, x, y = LegacyFunctionModel().double(), *build("mlp", loss)[1:]
    with pytest.raises(ArgumentError, match=r"one sample at a time.*setup_context.*forward"):
        natural_gradient(model, x, y, loss=loss, solver="cholesky")


def test_float32_model_is_close_to_float64_reference():
    model, inputs, targets = build("mlp", "cross_entropy")
    expected, _, _ = dense_direction(
        model, inputs, targets, "cross_entropy", "exact", 1e-2, list(model.parameters())
    )
    d = natural_gradient(
        model.float(),
        inputs.float(),
        targets,
        loss="cross_entropy",
        damping=1e-2,
        solver="kaczmarz",
        tol=1e-6,
        seed=0,
    )
    assert all(t.dtype == torch.float32 for t in d)
    assert relative_error(flat(d), expected) <= 1e-4


# -- side effects ------------------------------------------------------------------------
def test_inputs_params_and_grads_untouched():
    model, inputs, targets = build("mlp", "mse")
    model.net[0].weight.grad = torch.ones_like(model.net[0].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs_copy, targets_copy = inputs.clone(), targets.clone()
    natural_gradient(model, inputs, targets, fisher="sampled", seed=0)
    assert torch.equal(inputs, inputs_copy) and torch.equal(targets, targets_copy)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(model.net[0].weight.grad, torch.ones_like(model.net[0].weight))
    assert model.net[2].weight.grad is None


class InPlaceInput(MLP):
    """Writes its input in place: ``clamp_`` (idempotent) or ``mul_`` (not)."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, x):
        if self.op == "clamp_":
            x["x"].clamp_(-0.5, 0.5)
        else:
            x["x"].mul_(0.5)
        return self.net(x["x"])


@pytest.mark.parametrize("op", ["clamp_", "mul_"])
def test_a_forward_that_writes_its_inputs_in_place_is_stopped_after_one_evaluation(op):
    """clamp_ used to succeed with the caller's inputs silently clamped; mul_ ended in an
    error blaming sample coupling (BatchNorm) for what was an in-place write."""
    torch.manual_seed(0)
    model = InPlaceInput(op).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    original = x.clone()
    with pytest.raises(PolicyMutationError, match=r"wrote inputs\['x'\] in place .* out of"):
        natural_gradient(model, {"x": x}, torch.randn(N, 3, dtype=torch.float64))
    once = original.clamp(-0.5, 0.5) if op == "clamp_" else original * 0.5
    assert torch.equal(x, once)  # one evaluation, as model(inputs) itself would do


# -- solver behaviour --------------------------------------------------------------------
def test_nonconvergence_policies():
    model, inputs, targets = build("mlp", "cross_entropy")
    common = {
        "loss": "cross_entropy",
        "damping": 1e-3,
        "solver": "kaczmarz",
        "block_size": 4,
        "max_epochs": 1,
        "tol": 1e-12,
        "seed": 0,
    }
    with pytest.raises(NotConvergedError, match="max_epochs"):
        natural_gradient(model, inputs, targets, on_nonconvergence="raise", **common)
    with pytest.warns(NotConvergedWarning):
        natural_gradient(model, inputs, targets, on_nonconvergence="warn", **common)
    transform = SupervisedNaturalGradient(
        "cross_entropy", 1e-3, solver="kaczmarz", block_size=4, max_epochs=1, tol=1e-12
    )
    result = transform(model, inputs, targets)
    assert result.diagnostics.solver == "cholesky"
    assert "solved exactly with cholesky" in result.diagnostics.fallbacks[0]
    expected, _, _ = dense_direction(
        model, inputs, targets, "cross_entropy", "exact", 1e-3, list(model.parameters())
    )
    assert relative_error(flat(result.direction), expected) <= 1e-8


# -- errors ------------------------------------------------------------------------------
class NoOutputs(MLP):
    """Zero outputs per sample (a slice gone wrong)."""

    def forward(self, x):
        return self.net(x)[:, :0]


def _call(**overrides):
    model, inputs, targets = build("mlp", overrides.pop("_loss", "mse"))
    kwargs = {"model": model, "inputs": inputs, "targets": targets, **overrides}
    return natural_gradient(**kwargs)


class BatchMean(nn.Module):
    """Couples samples without a BatchNorm module (subtracts the batch mean)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(dim=0, keepdim=True)


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"loss": "nll"}, ValueError, "loss must be one of 'mse', 'cross_entropy', got 'nll'"),
        ({"fisher": "empirical"}, ValueError, "fisher must be one of 'exact', 'sampled'"),
        ({"solver": "lu"}, ValueError, "solver must be one of"),
        ({"damping": -0.1}, ValueError, "damping must be a finite float > 0, got -0.1"),
        ({"damping": 0}, ValueError, "damping must be"),
        ({"tol": float("nan")}, ValueError, "tol must be"),
        ({"tol": 1.5}, ValueError, r"tol must be a float in \(0, 1\), got 1.5"),
        ({"block_size": 0}, ValueError, "block_size must be an integer >= 1"),
        ({"seed": 1.5}, TypeError, "seed must be an int or None"),
        ({"seed": 2**70}, ValueError, r"seed must be an integer in \[0, 2\*\*64 - 1\]"),
        ({"model": lambda x: x}, TypeError, "model must be a torch.nn.Module"),
        (
            {"targets": torch.zeros(N * 3, dtype=torch.float64)},
            ValueError,
            r"reshape it with targets.reshape\(12, 3\)",
        ),
        ({"targets": torch.zeros(N, 3, dtype=torch.long)}, TypeError, "floating-point targets"),
        ({"inputs": torch.zeros(N, 4)}, TypeError, r"convert it with .to\(torch.float64\)"),
        (
            {"inputs": [torch.zeros(N, 4, dtype=torch.float64), 3]},
            TypeError,
            r"inputs\[1\] must be a torch.Tensor",
        ),
        ({"params": [torch.zeros(2, requires_grad=True)]}, ValueError, "is not a parameter"),
        (
            {"_loss": "cross_entropy", "targets": torch.zeros(N, 3)},
            TypeError,
            r"targets.argmax\(1\)",
        ),
        (
            {"_loss": "cross_entropy", "targets": torch.full((N,), 3)},
            ValueError,
            r"class index 3 outside \[0, 3\)",
        ),
        (
            {"_loss": "cross_entropy", "targets": torch.zeros(N - 1, dtype=torch.long)},
            ValueError,
            r"shape \(N,\) = \(12,\)",
        ),
        (  # torch's ignore_index: say it is not supported and what to do instead
            {"_loss": "cross_entropy", "targets": torch.full((N,), -100)},
            ValueError,
            r"class index -100 outside \[0, 3\).*ignore_index is not supported: drop those",
        ),
        (  # a list of labels: say how to convert it
            {"_loss": "cross_entropy", "targets": [0] * N},
            TypeError,
            r"class indices \(torch.long\), got list; convert it with torch.as_tensor",
        ),
        (  # used to be a raw RuntimeError from a reshape deep inside the Jacobians
            {"model": NoOutputs().double()},
            ValueError,
            r"shape \(12, 0\): no outputs per sample",
        ),
    ],
)
def test_misuse_raises_teaching_errors(overrides, error, pattern):
    if "_loss" in overrides:
        overrides = {**overrides, "loss": overrides["_loss"]}
    with pytest.raises(error, match=pattern):
        _call(**overrides)


def test_cross_entropy_needs_2d_logits_and_models_must_not_couple_samples():
    torch.manual_seed(0)
    scalar = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\)"):
        natural_gradient(scalar, x, torch.zeros(N, dtype=torch.long), loss="cross_entropy")
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    with pytest.raises(ValueError, match=r"eval\(\)"):
        natural_gradient(bn, x, torch.zeros(N, 3, dtype=torch.float64))
    dropout = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double()
    with pytest.raises(ValueError, match=r"eval\(\)"):
        natural_gradient(dropout, x, torch.zeros(N, 3, dtype=torch.float64))

    with pytest.raises(ValueError, match="couples samples"):
        natural_gradient(BatchMean().double(), x, torch.zeros(N, 3, dtype=torch.float64))


class BatchStd(nn.Module):
    """Normalizes with x.std(0): finite on the batch, NaN on one sample."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x / x.std(dim=0))


class SqrtOfSquare(nn.Module):
    """Finite outputs, NaN output Jacobians: sqrt(z^2) at z = 0 (0 / 0 in every row)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.head.weight[1] = 0.0
            self.head.bias[1] = 0.0

    def forward(self, x):
        z = self.head(x)
        return torch.sqrt(z * z)


@pytest.mark.parametrize("fisher", ["exact", "sampled"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_non_finite_output_jacobians_are_named_not_called_ill_conditioned(loss, fisher):
    """They reached the solver and were refused as cond ~ inf, 'use float64 parameters'."""
    model, x, y = SqrtOfSquare().double(), *build("mlp", loss)[1:]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        NonFiniteError,
        match=r"Jacobian of sample 0 \(output 0\).*model\.head"
        r"\.weight is NaN or inf.*epsilon",
    ):
        natural_gradient(model, x, y, loss=loss, fisher=fisher, solver="cholesky", seed=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_batch_statistics_that_are_nan_on_one_sample_are_called_coupling(loss):
    """NaN per-sample outputs passed the consistency check (NaN > tol is False) and ended
    in an IllConditionedError telling a float64 user to use float64 parameters."""
    model, x, y = BatchStd().double(), *build("mlp", loss)[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own std() warning
        with pytest.raises(
            ArgumentError,
            match=r"sample 0 is not finite when computed alone.*"
            r"couples samples.*x\.std\(0\)",
        ):
            natural_gradient(model, x, y, loss=loss, solver="cholesky")


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_bfloat16_model_is_answered_within_its_precision_not_blamed_on_coupling(loss):
    """bfloat16 rounds an output computed alone and in the batch apart by ~2**-8 relative; a
    fixed 2e-3 tolerance blamed that on sample coupling. The answer is meaningful: 1-3% off
    the float64 direction of the same rounded model, within the reported precision."""
    model, inputs, targets = build("mlp", loss)
    model, inputs = model.to(torch.bfloat16), inputs.to(torch.bfloat16)
    targets = targets.to(torch.bfloat16) if loss == "mse" else targets
    with pytest.warns(PrecisionWarning):  # bfloat16 cannot deliver tol = 1e-3: flagged
        result = SupervisedNaturalGradient(loss, 1e-2, solver="cholesky")(model, inputs, targets)
    reference = copy.deepcopy(model).double()
    float_targets = targets.double() if loss == "mse" else targets
    expected, _, _ = dense_direction(
        reference, inputs.double(), float_targets, loss, "exact", 1e-2, list(reference.parameters())
    )
    error = relative_error(flat(result.direction), expected)
    assert error <= result.diagnostics.precision and error <= 0.05, error


def test_bfloat16_coupling_is_still_refused():
    torch.manual_seed(0)
    x = torch.randn(N, 4).to(torch.bfloat16)
    with pytest.raises(ArgumentError, match="couples samples"):
        natural_gradient(BatchMean().to(torch.bfloat16), x, torch.zeros(N, 3, dtype=torch.bfloat16))


# -- the sampled Fisher, checked without the implementation's own samples -----------------
def test_mse_sampled_targets_are_outputs_plus_standard_normal_noise():
    """fisher="sampled" for mse draws y~ = f(x) + eps, eps ~ N(0, I_k), from the generator
    seeded with ``seed`` (its first draw): recomputed here from a fresh generator."""
    model, inputs, targets = build("mlp", "mse")
    transform = SupervisedNaturalGradient("mse", 1e-1, "sampled", "cholesky", seed=11)
    result = transform(model, inputs, targets)
    with torch.no_grad():
        outputs = model(inputs)
    noise = torch.randn(
        outputs.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64
    )
    torch.testing.assert_close(result.sampled_targets, outputs + noise, rtol=0, atol=1e-12)


def test_mse_sampled_noise_is_standard_normal_over_many_draws():
    """E[eps] = 0 and E[eps eps^T] = I_k, so that E[W^T W / N] is the Gauss-Newton matrix."""
    model, inputs, targets = build("mlp", "mse")
    transform = SupervisedNaturalGradient("mse", 1e-1, "sampled", "cholesky", seed=0)
    with torch.no_grad():
        outputs = model(inputs)
    draws = torch.cat(
        [transform(model, inputs, targets).sampled_targets - outputs for _ in range(100)]
    )  # (100 N, k): 1200 draws of a 3-vector
    assert draws.shape == (100 * N, 3)
    assert float(draws.mean(0).abs().max()) < 0.12  # standard error 0.03
    covariance = draws.T @ draws / draws.shape[0]
    torch.testing.assert_close(
        covariance, torch.eye(3, dtype=torch.float64), rtol=0, atol=0.15
    )  # standard error of each entry about 0.04


def test_mean_loss_is_the_loss_the_direction_is_taken_of():
    model, inputs, targets = build("mlp", "mse", outputs=1)
    outputs = model(inputs)
    result = SupervisedNaturalGradient("mse", 1e-2, solver="cholesky")(model, inputs, targets)
    assert float(mean_loss(outputs, targets, "mse")) == pytest.approx(result.loss, rel=1e-12)
    scalar = outputs.reshape(-1)  # (N,) outputs with (N,) targets, as natural_gradient takes
    assert float(mean_loss(scalar, targets.reshape(-1), "mse")) == pytest.approx(result.loss)


@pytest.mark.parametrize(
    ("outputs", "targets", "loss", "error", "pattern"),
    [
        # (N, 1) against (N,) used to broadcast to (N, N): a wrong loss, no error
        ((N, 1), (N,), "mse", ArgumentError, r"same shape.*\(12, 1\).*\(12,\).*reshape"),
        ((N, 3), (N,), "MSE", ArgumentError, r"loss must be one of"),  # was cross-entropy
        ((N, 3), (N, 3), "cross_entropy", ArgumentError, r"class indices of shape \(N,\)"),
        ((N, 3), "int", "mse", ArgumentTypeError, r"floating-point targets"),
    ],
)
def test_mean_loss_refuses_what_it_would_broadcast_or_misread(
    outputs, targets, loss, error, pattern
):
    out = torch.zeros(outputs, dtype=torch.float64)
    if targets == "int":
        tgt = torch.zeros(outputs, dtype=torch.long)
    elif loss == "mse" or len(targets) > 1:
        tgt = torch.arange(float(math.prod(targets)), dtype=torch.float64).reshape(targets)
    else:
        tgt = torch.zeros(targets, dtype=torch.long)
    with pytest.raises(error, match=pattern):
        mean_loss(out, tgt, loss)


# -- docs: see tests/test_docstrings.py --------------------------------------------------


def test_a_nan_parameter_is_named_as_the_models_not_a_policys():
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"model.weight contains NaN .* the model was already"):
        natural_gradient(model, x, y)
    assert math.isnan(float(model.weight[0, 0]))  # reported, not changed


class _PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
        self.head = nn.Linear(4, 2)

    def forward(self, inputs):
        return self.head(self.encoder(inputs["x"], src_key_padding_mask=inputs["mask"]).mean(1))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_transformer_encoder_with_padding_mask_in_eval_mode_is_not_called_coupling():
    """model(inputs) under no_grad took nn.TransformerEncoder's nested-tensor fast path
    (zeros at padded positions), which the per-sample Jacobians never see."""
    torch.manual_seed(0)
    model = _PaddedEncoder().double().eval()
    mask = torch.zeros(6, 3, dtype=torch.bool)
    mask[::2, -1] = True
    inputs = {"x": torch.randn(6, 3, 4, dtype=torch.float64), "mask": mask}
    direction = natural_gradient(model, inputs, torch.randn(6, 2, dtype=torch.float64), "mse", 1e-2)
    assert all(torch.isfinite(d).all() for d in direction)
    assert torch.backends.mha.get_fastpath_enabled()
