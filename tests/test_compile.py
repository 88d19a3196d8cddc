"""The ``compile=True`` fused path: same answers as eager, on CPU, for every backend."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, build
from reference import dense_natural_gradient, dense_scores, reference_log_prob

from natgrad import NotConvergedWarning, RATNaturalGradient

N = 24
CASE_NAMES = ("gaussian_mlp", "categorical_cnn", "dict_obs")
SOLVERS = {"cg": {"max_iters": 400}, "kaczmarz": {"block_size": 12, "max_epochs": 400}}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def case_named(name: str):
    return next(c for c in CASES if c.name == name)


@pytest.mark.parametrize("backend", ["factored", "materialized", "streaming"])
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("name", CASE_NAMES)
def test_compiled_equals_eager_and_reference(name, solver, backend):
    case = case_named(name)
    policy, obs, acts, adv = build(case, N)
    damping = 0.5  # Kaczmarz reaches 1e-12 within the epoch cap on every case
    chosen = [p for p in policy.parameters() if p.requires_grad]
    scores = dense_scores(policy, case.log_prob_fn or reference_log_prob, obs, acts, chosen, N)
    expected = dense_natural_gradient(scores, adv, damping)
    directions = {}
    for compiled in (False, True):
        rat = RATNaturalGradient(
            case.log_prob_fn,
            damping=damping,
            solver=solver,
            tol=1e-12,
            seed=0,
            backend=backend,
            compile=compiled,
            on_nonconvergence="raise",
            **SOLVERS[solver],
        )
        result = rat.natural_gradient(policy, obs, acts, adv)
        directions[compiled] = flat(result.direction)
        assert rat.diagnostics.backend == backend
        fused_expected = compiled and not (solver == "cg" and backend == "streaming")
        assert rat.diagnostics.compiled is fused_expected
        if compiled and not fused_expected:
            assert any("compile=True" in note for note in rat.diagnostics.fallbacks)
    scale = torch.linalg.vector_norm(expected)
    assert torch.linalg.vector_norm(directions[True] - expected) <= 1e-8 * scale
    assert torch.linalg.vector_norm(directions[True] - directions[False]) <= 1e-8 * scale


@pytest.mark.parametrize("backend", ["factored", "materialized"])
def test_compiled_kaczmarz_is_the_same_iteration_as_eager(backend):
    """Stopped after two epochs, far from the solution, the fused step gives the eager
    iterate: the same projections, not merely a method with the same fixed point (a
    relaxed step would converge to the same answer, only slower)."""
    case = case_named("gaussian_mlp")
    policy, obs, acts, adv = build(case, N)
    iterates = []
    for compiled in (False, True):
        rat = RATNaturalGradient(
            damping=0.5,
            solver="kaczmarz",
            block_size=12,
            max_epochs=2,
            tol=1e-13,  # far below what two epochs reach, above the rounding level
            seed=0,
            backend=backend,
            compile=compiled,
            on_nonconvergence="warn",
        )
        with pytest.warns(NotConvergedWarning):
            iterates.append(rat(policy, obs, acts, adv))
        assert rat.diagnostics.solver == "kaczmarz" and rat.diagnostics.iterations == 2
        assert rat.diagnostics.compiled is compiled
    scale = torch.linalg.vector_norm(iterates[0])
    assert torch.linalg.vector_norm(iterates[1] - iterates[0]) <= 1e-10 * scale


@pytest.mark.parametrize("backend", ["materialized"])  # factored: +30 s of compilation
def test_compiled_float32_close_to_eager(backend):
    """In float32 the fused graph may reorder sums: equal within float32 rounding.

    Both calls must run Kaczmarz to ``tol`` themselves (``on_nonconvergence="raise"``),
    the second one through the compiled step: a Cholesky fallback on both sides would
    compare Cholesky with itself.
    """
    case = case_named("gaussian_mlp")
    policy, obs, acts, adv = build(case, 256)
    policy, obs, acts, adv = policy.float(), obs.float(), acts.float(), adv.float()
    outputs = []
    for compiled in (False, True):
        rat = RATNaturalGradient(
            damping=0.5,
            solver="kaczmarz",
            block_size=64,
            max_epochs=200,
            tol=1e-4,
            seed=3,
            backend=backend,
            compile=compiled,
            on_nonconvergence="raise",
        )
        outputs.append(rat(policy, obs, acts, adv))
        assert outputs[-1].dtype == torch.float32
        assert rat.diagnostics.solver == "kaczmarz"
        assert rat.diagnostics.backend == backend
        assert rat.diagnostics.compiled is compiled
        assert rat.diagnostics.residual <= 1e-4
    scale = outputs[0].abs().max()
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4 * scale)
    # Same seed, same blocks: the two paths are the same iteration, not just both close
    # to the answer; and both are close to the float64 reference.
    expected = RATNaturalGradient(damping=0.5, solver="cholesky")(
        policy.double(), obs.double(), acts.double(), adv.double()
    )
    for out in outputs:
        error = torch.linalg.vector_norm(out.double() - expected)
        assert error <= 1e-3 * torch.linalg.vector_norm(expected)


def test_compile_must_be_bool():
    with pytest.raises(TypeError, match="compile must be True or False"):
        RATNaturalGradient(compile="yes")


def test_compiled_block_factor_is_the_eager_factor(monkeypatch):
    """The compiled Cholesky factor of ``J_S J_S^T / N + lam I`` is the eager one; a wrong
    compiled factor must not hide behind the eager retry on LinAlgError."""
    from natgrad.scores import MaterializedScores
    from natgrad.solvers import kaczmarz

    gen = torch.Generator().manual_seed(0)
    operator = MaterializedScores(torch.randn(16, 10, generator=gen, dtype=torch.float64))
    block = operator.block(torch.arange(6))
    eager = kaczmarz.block_factor(block, 16, 0.3)
    calls = []
    original = kaczmarz.fused_block_factor
    monkeypatch.setattr(kaczmarz, "fused_block_factor", lambda *a: calls.append(1) or original(*a))
    compiled = kaczmarz.block_factor(block, 16, 0.3, compiled=True)
    assert calls, "the compiled factor was not used"
    assert torch.allclose(compiled, eager, rtol=1e-10, atol=1e-12)
    direct = original(*block.functional(), 0.3, 1.0 / 16)  # no eager retry in between
    assert torch.allclose(direct, eager, rtol=1e-10, atol=1e-12)


def test_payload_dtype_is_that_of_the_first_leaf_of_a_single_layer_payload():
    # a policy with one factored layer: the payload's layer tuple has one element (kills
    # fused.py:41 first[0] -> first[1], which only the multi-layer payloads survive)
    from natgrad.factored import FactoredPayload
    from natgrad.layers.linear import LinearFactor
    from natgrad.solvers.fused import _payload_dtype

    factor = LinearFactor(
        torch.zeros(4, 3, dtype=torch.float64),
        torch.zeros(4, 2, dtype=torch.float64),
        torch.arange(6),
    )
    assert _payload_dtype(FactoredPayload((factor,), None, None, 6)) == torch.float64
