"""Tests for the gaps that mutation testing found (benchmarks/mutations/mutation_report.md).

Each test names the surviving mutants it kills; all of them run in well under a second.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from natgrad.results import Diagnostics, NaturalGradient
from natgrad.scores import MaterializedScores
from natgrad.solvers import SOLVER_REGISTRY, SolverOptions, cholesky_solve


def _diagnostics(**overrides) -> Diagnostics:
    fields = dict(
        solver="cholesky",
        backend="materialized",
        score_path="vmap",
        residual=0.0,
        iterations=1,
        converged=True,
        seconds=0.0,
        fallbacks=(),
        num_samples=3,
        num_params=2,
    )
    return Diagnostics(**{**fields, **overrides})


def _problem(n: int = 6, p: int = 4):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(n, p, generator=gen, dtype=torch.float64)
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    return MaterializedScores(scores), rhs


def test_results_are_immutable():
    # kills results.py:11 and results.py:70 @dataclass(frozen=True) -> frozen=False
    diagnostics = _diagnostics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        diagnostics.converged = False
    result = NaturalGradient(
        advantages=torch.zeros(3),
        direction=(torch.zeros(2),),
        param_names=("w",),
        jd=torch.zeros(3),
        g_dot_d=0.0,
        d_fisher_d=0.0,
        diagnostics=diagnostics,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.d_fisher_d = 1.0
    operator, rhs = _problem()
    with pytest.raises(dataclasses.FrozenInstanceError):  # kills _base.py:14 (SolveResult)
        cholesky_solve(operator, rhs, 0.1).residual = 0.0


def test_diagnostics_optional_fields_default_to_not_compiled_and_unknown():
    # kills results.py:64 compiled: bool = False -> True
    diagnostics = _diagnostics()
    assert diagnostics.compiled is False
    assert diagnostics.direction_error is None
    assert diagnostics.condition is None
    assert diagnostics.precision is None


def test_cholesky_counts_one_iteration():
    # Diagnostics.iterations is documented as "1 for Cholesky";
    # kills cholesky.py:53 iterations=1 -> 0 and -> 2
    operator, rhs = _problem()
    result = cholesky_solve(operator, rhs, 0.1)
    assert result.iterations == 1
    assert result.compiled is False  # kills _base.py:51 SolveResult.compiled default -> True
    options = SolverOptions(damping=0.1)
    generator = torch.Generator().manual_seed(0)
    assert SOLVER_REGISTRY["cholesky"].solve(operator, rhs, options, generator).iterations == 1


def test_cholesky_registry_metadata():
    # the documented Solver fields of the built-in Cholesky: exact (no on_nonconvergence
    # policy) and forms the Gram matrix; kills cholesky.py:68 iterative=False -> True and
    # needs_gram=True -> False
    solver = SOLVER_REGISTRY["cholesky"]
    assert solver.iterative is False
    assert solver.needs_gram is True
    assert SOLVER_REGISTRY["kaczmarz"].iterative is True
    assert SOLVER_REGISTRY["cg"].iterative is True


def test_relative_residual_of_a_zero_right_hand_side_is_absolute():
    # kills _base.py:62 jv + damping * x -> jv + damping + x
    from natgrad.solvers._base import relative_residual

    jv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    expected = float(torch.linalg.vector_norm(jv + 0.3 * x))
    assert relative_residual(torch.zeros(3, dtype=torch.float64), jv, x, 0.3) == pytest.approx(
        expected, rel=1e-12
    )


def test_not_positive_definite_suggests_the_documented_damping():
    # suggestion = 10 eps max(largest - damping, 0) sqrt(n); kills _base.py:70 (10 * -> 10 +,
    # ** 0.5 -> * 0.5, ** 0.5 -> ** 1.5)
    from natgrad.solvers._base import not_positive_definite

    # (and largest - damping -> largest + damping)
    matrix = torch.diag(torch.tensor([2.0] + [1.0] * 8, dtype=torch.float64))
    eps = torch.finfo(torch.float32).eps
    suggestion = 10 * eps * (2.0 - 1.5) * 3.0  # below 1: also kills max(., 0.0) -> max(., 1.0)
    message = str(not_positive_definite(1.5, matrix, torch.float32))
    assert f"use damping >= {suggestion:.2g} or float64 parameters" in message


@pytest.mark.parametrize("offset", [False, True])
def test_direction_error_is_the_documented_bound(offset):
    # e = |r| / (2 sqrt(lam N)); bound e / (|d| - e); kills _base.py:121-127
    from natgrad.solvers._base import direction_error

    v = torch.tensor([3.0, 4.0], dtype=torch.float64)  # |v| = 5
    v0 = torch.tensor([1.0, 1.0], dtype=torch.float64) if offset else None
    size = 5.0 if not offset else float(torch.linalg.vector_norm(v - v0))
    # lam N = 9: e = |r| / 6 (2 * 3 differs from 2 + 3 and from 2 / 3)
    assert direction_error(1.0, v, 1.0, 9, v0) == pytest.approx((1 / 6) / (size - 1 / 6))
    assert direction_error(0.0, v, 1.0, 9, v0) == 0.0
    # e = 1 exactly (kills _base.py:122 absolute == 0.0 -> == 1.0)
    assert direction_error(6.0, v, 1.0, 9, v0) == pytest.approx(1.0 / (size - 1.0), rel=1e-12)
    assert direction_error(100.0, v, 1.0, 9, v0) == float("inf")
    # |d| == e exactly: no bound (kills _base.py:125 size > absolute -> size >= absolute)
    edge = torch.tensor([0.5, 0.0], dtype=torch.float64)
    assert direction_error(3.0, edge, 1.0, 9) == float("inf")
    # zero residual, zero direction: exact (kills _base.py:122 == 0.0 -> == -1.0)
    assert direction_error(0.0, torch.zeros(2, dtype=torch.float64), 1.0, 9) == 0.0


@pytest.mark.parametrize(
    "matrix",
    [[[1.0, 0.0], [0.0, -1.0]], [[1.0, 2.0], [2.0, 1.0]]],  # indefinite: finite partial factor
)
def test_cholesky_factor_refuses_an_indefinite_matrix(matrix):
    # cholesky_ex reports info != 0 with a finite diagonal; kills _base.py:82 or -> and
    from natgrad.errors import IllConditionedError
    from natgrad.solvers._base import cholesky_factor

    with pytest.raises(IllConditionedError, match="not positive definite"):
        cholesky_factor(torch.tensor(matrix, dtype=torch.float64), 1e-3, torch.float64)


@pytest.mark.parametrize(
    ("eps_work", "eps_score", "most"),
    [(1e-3, 1e-3, 50.0), (1e-6, 1e-2, 25.0)],  # each arm of the min in turn
)
def test_minimum_damping_is_the_documented_formula(eps_work, eps_score, most):
    # most = min(target / (2 eps_w), (target / (2 eps_s))^2); lam = lambda_max / (most - 1);
    # kills conditioning.py:64 and :67
    from natgrad.solvers.conditioning import Conditioning

    conditioning = Conditioning(
        condition=10.0, precision=0.0, largest_eigenvalue=3.0, product_error=0.0
    )
    assert conditioning.minimum_damping(eps_work, eps_score, 0.1) == pytest.approx(
        3.0 / (most - 1.0), rel=1e-9
    )
    assert conditioning.minimum_damping(eps_work, eps_score, 1e-9) == float("inf")
    # most == 1 exactly: unreachable too (kills conditioning.py:65 most <= 1.0 -> <= 0.0)
    assert conditioning.minimum_damping(0.05, 1e-12, 0.1) == float("inf")


def test_power_iteration_only_when_the_trace_bound_exceeds_tol():
    # precision(trace) == tol exactly: the trace bound suffices, no power iteration (whose
    # estimate of lambda_max is below the trace here); kills conditioning.py:99 > -> >=
    from natgrad.solvers.conditioning import _conditioning, estimate_conditioning

    operator, _ = _problem()
    n = operator.num_samples
    trace = float(operator.squared_norms().to(torch.float64).sum()) / n
    eps = torch.finfo(torch.float64).eps
    damping = 1e-6
    tol = _conditioning(trace, damping, eps, eps).precision
    assert estimate_conditioning(operator, damping, tol).largest_eigenvalue == trace
    refined = estimate_conditioning(operator, damping, tol / 2).largest_eigenvalue
    assert refined < trace


def test_power_iteration_estimates_the_largest_eigenvalue():
    # one dominant direction: 8 power iterations find lambda_max(K / N), the first Rayleigh
    # quotient does not; kills conditioning.py:107 == 0.0 -> != 0.0 (stop after one step)
    from natgrad.solvers.conditioning import estimate_conditioning

    gen = torch.Generator().manual_seed(1)
    n, p = 12, 5
    u = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    scores = 10 * u @ torch.randn(1, p, generator=gen, dtype=torch.float64)
    scores += 0.1 * torch.randn(n, p, generator=gen, dtype=torch.float64)
    operator = MaterializedScores(scores)
    exact = float(torch.linalg.eigvalsh(scores @ scores.T / n)[-1])
    estimate = estimate_conditioning(operator, 1e-9, 1e-12).largest_eigenvalue
    assert estimate == pytest.approx(exact, rel=1e-6)


def test_solver_options_store_the_validated_values():
    # the checks convert (an int damping becomes a float, a numpy int an int); kills
    # options.py:101 for ... in checked.items() -> in []
    import numpy as np

    options = SolverOptions(damping=1, block_size=np.int64(8))
    assert type(options.damping) is float
    assert type(options.block_size) is int


def test_documented_defaults_and_presets():
    # docs: preconditioner_rank=256 (choosing.md, performance.md), RL preset block 256,
    # 20 epochs, tol 1e-3, damping 0.1 (rl.md, torchrl.md); SUPERVISED and max_iters are
    # public values shown in the signatures. Kills options.py:72-80, :131, :135
    from natgrad.solvers import RL_AGENT, SUPERVISED

    defaults = SolverOptions()
    assert dataclasses.asdict(defaults) == dict(
        solver="auto",
        damping=1e-3,
        block_size=512,
        max_epochs=10,
        tol=5e-2,
        max_iters=200,
        on_nonconvergence="fallback",
        resample_blocks=False,
        compile=False,
        preconditioner_rank=256,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):  # kills options.py:39 frozen=False
        defaults.damping = 1.0
    assert (RL_AGENT.damping, RL_AGENT.block_size, RL_AGENT.max_epochs, RL_AGENT.tol) == (
        0.1,
        256,
        20,
        1e-3,
    )
    assert (SUPERVISED.solver, SUPERVISED.block_size, SUPERVISED.max_epochs) == (
        "kaczmarz",
        256,
        50,
    )
    assert (SUPERVISED.tol, SUPERVISED.preconditioner_rank) == (1e-3, 0)


def test_settings_deprecation_points_at_the_caller():
    # kills options.py:159 stacklevel=2 -> 3 and -> 1
    from natgrad import RATNaturalGradient

    ng = RATNaturalGradient(torch.nn.Linear(2, 2))
    with pytest.warns(DeprecationWarning, match="settings") as record:
        options = ng.settings
    assert record[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="settings") as record:  # options.py:166
        ng.settings = options
    assert record[0].filename == __file__


def test_deprecated_solver_aliases_point_at_the_caller():
    # kills solvers/__init__.py:77 stacklevel=2 -> 1 and -> 3
    import natgrad.solvers

    with pytest.warns(DeprecationWarning, match="SolverSettings") as record:
        assert natgrad.solvers.SolverSettings is SolverOptions
    assert record[0].filename == __file__


@pytest.mark.parametrize("case", ["two orthogonal rows", "twelve rows", "lambda_max below one"])
def test_conditioning_matches_the_dense_spectrum(case):
    # condition = (lambda_max(K/N) + lam) / lam from the dense eigenvalues, precision =
    # condition eps_w + sqrt(condition) eps_s; with n = 2 equal orthogonal rows the trace is
    # twice lambda_max, so skipping the power iteration shows. Kills conditioning.py:71
    # (+ -> -), :73 (+ -> -, ** -> *, 0.5 -> -0.5) and :99 (n > 1 -> n > 2)
    from natgrad.solvers.conditioning import estimate_conditioning

    if case == "two orthogonal rows":
        scores = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    elif case == "twelve rows":
        gen = torch.Generator().manual_seed(3)
        scores = torch.randn(12, 5, generator=gen, dtype=torch.float64)
        scores[:, 0] *= 6.0  # a clear spectral gap: the power iteration converges
    else:  # eigenvalues of K / N: 0.8 and eleven times 0.1 (trace 1.9 > 1 > lambda_max)
        gen = torch.Generator().manual_seed(4)
        basis, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
        spectrum = torch.tensor([0.8] + [0.1] * 11, dtype=torch.float64)
        scores = basis * (12 * spectrum).sqrt()  # kills conditioning.py:111 max(., 1.0)
    operator = MaterializedScores(scores)
    n, damping = scores.shape[0], 1e-2
    largest = float(torch.linalg.eigvalsh(scores @ scores.T / n)[-1])
    result = estimate_conditioning(operator, damping, tol=1e-30)
    condition = (largest + damping) / damping
    eps = torch.finfo(torch.float64).eps  # abs=0: these are ~1e-13, below approx's default abs
    assert result.condition == pytest.approx(condition, rel=1e-6, abs=0.0)
    assert result.product_error == pytest.approx(condition * eps, rel=1e-6, abs=0.0)
    assert result.precision == pytest.approx(
        condition * eps + condition**0.5 * eps, rel=1e-6, abs=0.0
    )


def test_minimum_damping_just_above_the_reachable_limit():
    # most = 1.5 (target / (2 eps_w)): reachable, lam = lambda_max / 0.5; kills
    # conditioning.py:65 most <= 1.0 -> most <= 2.0
    from natgrad.solvers.conditioning import Conditioning

    conditioning = Conditioning(
        condition=10.0, precision=0.0, largest_eigenvalue=3.0, product_error=0.0
    )
    assert conditioning.minimum_damping(0.1 / 3.0, 1e-12, 0.1) == pytest.approx(6.0)


def test_conditioning_is_immutable():
    # diagnostics hold it: nobody may change the estimate after the fact; kills
    # conditioning.py:35 frozen=True -> False
    from natgrad.solvers.conditioning import Conditioning

    conditioning = Conditioning(
        condition=1.0, precision=0.0, largest_eigenvalue=0.0, product_error=0.0
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        conditioning.condition = 2.0


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e3])
@pytest.mark.parametrize("kind", ["full rank", "low rank", "duplicated rows"])
def test_full_rank_nystrom_is_the_exact_inverse(kind, scale):
    # documented: rank >= N makes P = K / N + lam I itself. Full rank J takes the r x r
    # Cholesky path, low-rank and duplicated J the eigen pseudo-inverse; the scale moves
    # every eigenvalue (the drop threshold must be relative). Kills nystrom.py:53 and :66
    # (/ damping -> * damping), :59 (threshold / max, clamp_min(1.0))
    from natgrad.solvers.nystrom import nystrom_preconditioner

    gen = torch.Generator().manual_seed(0)
    n, p = 12, 20
    if kind == "full rank":
        scores = torch.randn(n, p, generator=gen, dtype=torch.float64)
    else:
        left = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        scores = left @ torch.randn(3, p, generator=gen, dtype=torch.float64)
    if kind == "duplicated rows":
        scores[:6] = scores[6:]
    scores = scores * scale
    damping = 1e-3 * scale**2
    operator = MaterializedScores(scores)
    apply = nystrom_preconditioner(operator, damping, n, torch.Generator().manual_seed(0))
    assert apply is not None
    inverse = torch.stack([apply(e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    system = scores @ scores.T / n + damping * torch.eye(n, dtype=torch.float64)
    exact = torch.linalg.inv(system)
    assert float((inverse - exact).abs().max()) <= 1e-6 * float(exact.abs().max())


def test_solver_metadata_is_truthful():
    # needs_gram says whether a solver forms the N x N Gram matrix: only cholesky does;
    # a new Solver does not unless it says so. Kills registry.py:77 needs_gram default True
    from natgrad.solvers import Solver

    operator, rhs = _problem()
    for name, solver in SOLVER_REGISTRY.items():
        calls = []

        def spy(*args, _calls=calls, _original=operator.gram, **kwargs):
            _calls.append(1)
            return _original(*args, **kwargs)

        operator.gram = spy
        try:
            solver.solve(operator, rhs / rhs.abs().max(), SolverOptions(), torch.Generator())
        finally:
            del operator.gram
        assert solver.needs_gram == bool(calls), name
    assert Solver("mine", solver.solve).needs_gram is False


def test_solver_entries_are_immutable_and_names_checked():
    # kills registry.py:50 frozen=True -> False and :85 `or` -> `and`
    from natgrad.solvers import Solver, register_solver

    solver = SOLVER_REGISTRY["cg"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.iterative = False
    for bad in ("auto", "not an identifier"):
        with pytest.raises(ValueError, match="identifier other than 'auto'"):
            register_solver(Solver(bad, solver.solve))
        assert bad not in SOLVER_REGISTRY


def test_cg_on_a_zero_right_hand_side_does_no_work():
    # public cg_solve: zero rhs -> x = 0 in zero iterations, converged; kills cg.py:68 (0 -> -1)
    from natgrad.solvers import cg_solve

    operator, rhs = _problem()
    result = cg_solve(operator, torch.zeros_like(rhs), 0.1, tol=1e-8, max_iters=50)
    assert result.iterations == 0 and result.converged
    assert not result.x.any() and not result.v.any()
    assert result.residual == 0.0 and result.direction_error == 0.0  # kills :68 0.0 -> 1.0


def test_uncompiled_products_never_build_the_fused_kernel(monkeypatch):
    # compile=False must not reach torch.compile (slow, and absent on some platforms);
    # kills _products.py:21 `if compiled` -> `if not compiled`
    from natgrad.solvers import _products

    operator, _ = _problem()
    monkeypatch.setattr(operator, "functional", lambda: pytest.fail("functional() called"))
    v, jv = _products.apply_kernel(operator, torch.ones(operator.num_samples, dtype=torch.float64))
    assert torch.allclose(jv, operator.matvec(v))


def test_cg_direction_error_bounds_the_true_error_when_stopped_early():
    # the reported bound must hold for an unconverged iterate; kills cg.py:102
    # residual * rhs_norm -> residual - rhs_norm (a negative "bound")
    from natgrad.solvers import cg_solve

    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(30, 40, generator=gen, dtype=torch.float64)
    scores[:, :3] *= 10.0
    operator = MaterializedScores(scores)
    rhs = torch.randn(30, generator=gen, dtype=torch.float64)
    damping = 1e-2
    exact = cholesky_solve(operator, rhs, damping).v
    for iterations in (1, 2, 4):
        result = cg_solve(operator, rhs, damping, tol=1e-12, max_iters=iterations)
        assert not result.converged
        assert result.iterations == iterations  # kills cg.py:83 < max_iters -> <= max_iters
        true_error = float(torch.linalg.vector_norm(result.v - exact)) / float(
            torch.linalg.vector_norm(exact)
        )
        assert result.direction_error >= true_error > 0


def test_cg_compiles_exactly_the_operators_with_a_functional_form():
    # kills cg.py:130 `functional() is not None` -> `is None`
    from natgrad.scores import StreamingScores

    dense, _ = _problem()
    assert dense.functional() is not None
    assert SOLVER_REGISTRY["cg"].compiles(dense) is True
    streaming = StreamingScores.__new__(StreamingScores)  # functional() needs no state
    assert streaming.functional() is None
    assert SOLVER_REGISTRY["cg"].compiles(streaming) is False


def test_kaczmarz_public_functions_keep_their_documented_signatures(monkeypatch):
    # keywords by name (kills kaczmarz.py:127 `*` -> `/`); max_epochs=0 does nothing
    # (kills :181 epoch = 0 -> -1); zero rhs (kills :170 0.0 -> 1.0); kaczmarz_step is
    # eager unless asked (kills :76 compiled=False -> True)
    from natgrad.solvers import kaczmarz
    from natgrad.solvers.kaczmarz import KaczmarzState, kaczmarz_solve, kaczmarz_step

    operator, rhs = _problem()
    kwargs = dict(block_size=3, max_epochs=0, tol=1e-8, generator=torch.Generator())
    nothing = kaczmarz_solve(operator=operator, rhs=rhs, damping=0.5, **kwargs)
    assert nothing.iterations == 0 and not nothing.converged and not nothing.x.any()
    zero = kaczmarz_solve(operator, torch.zeros_like(rhs), 0.5, **{**kwargs, "max_epochs": 5})
    assert zero.converged and zero.iterations == 0
    assert zero.residual == 0.0 and zero.direction_error == 0.0
    monkeypatch.setattr(kaczmarz, "fused_block_step", lambda *a: pytest.fail("compiled"))
    state = KaczmarzState.zeros(operator, rhs.device)
    index = torch.arange(3)
    kaczmarz_step(state, operator.block(index), index, rhs, 0.5)
    assert state.x[3:].eq(0).all() and state.x[:3].ne(0).any()


def test_kaczmarz_stops_as_soon_as_it_is_accurate():
    # the sweep's residuals show convergence long before max_epochs; kills kaczmarz.py:196
    # sqrt(swept) -> swept + 0.5 (never accurate until the last epoch)
    from natgrad.solvers.kaczmarz import kaczmarz_solve

    operator, rhs = _problem(n=12, p=40)
    result = kaczmarz_solve(operator, rhs, 2.0, block_size=4, max_epochs=500, tol=1e-8,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.converged and result.iterations < 100


def test_scaled_push_through_solve_bounds_the_direction_error():
    # d ~ v - v0 with a large rhs scale: dispatch scales rhs and v0 together; kills
    # dispatch.py:112 direction_offset / scale -> direction_offset - scale
    from natgrad.solvers import solve

    operator, rhs = _problem(n=20, p=30)
    gen = torch.Generator().manual_seed(7)
    offset = torch.randn(30, generator=gen, dtype=torch.float64)
    scale = 1e3
    exact = cholesky_solve(operator, rhs, 0.05).v - offset
    options = SolverOptions(solver="cg", damping=0.05, tol=1e-12, max_iters=2,
                            on_nonconvergence="warn", preconditioner_rank=0)  # fmt: skip
    with pytest.warns(Warning):
        result, _, _ = solve(operator, scale * rhs, options, torch.Generator(),
                             direction_offset=scale * offset)  # fmt: skip
    true_error = float(torch.linalg.vector_norm(result.v / scale - offset - exact)) / float(
        torch.linalg.vector_norm(exact)
    )
    assert result.direction_error >= true_error > 1e-6


class _PolicyWithValueHead(torch.nn.Module):
    """Gaussian policy whose forward also runs a value head the distribution never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 5)
        self.mean = torch.nn.Linear(5, 2)
        self.value = torch.nn.Linear(5, 1)  # called, but not part of log pi
        self.log_std = torch.nn.Parameter(torch.tensor([0.1, -0.2]))  # a non-factored "rest"

    def forward(self, obs):
        h = torch.tanh(self.body(obs))
        self.last_value = self.value(h)
        return torch.distributions.Normal(self.mean(h), self.log_std.exp())


def test_factored_norms_rows_and_unused_outputs_match_the_dense_scores():
    # squared norms and dense rows include the non-factored parameters exactly (kills
    # factored.py:200 ** 2 -> + 2, * 2, ** 3, ** 1 and :206/:208 in dense_rows); a factorable
    # layer whose output log pi does not use keeps the factored path (kills :274
    # allow_unused=True -> False)
    from natgrad import default_log_prob
    from natgrad.factored import build_factored_scores
    from natgrad.scores import PolicyScores

    torch.manual_seed(0)
    policy = _PolicyWithValueHead().double()
    obs = torch.randn(16, 3, dtype=torch.float64)
    acts = torch.randn(16, 2, dtype=torch.float64)
    names = [n for n, _ in policy.named_parameters()]  # value.*: all-zero score columns
    with torch.no_grad():
        log_probs = default_log_prob(policy, obs, acts)
    scores = PolicyScores(policy, default_log_prob, obs, acts, names, log_probs)
    factored, reason = build_factored_scores(scores, policy, default_log_prob, obs, acts, 8)
    assert factored is not None, reason
    assert factored.rest is not None  # log_std is not in a factorable layer
    dense = MaterializedScores.from_policy(scores, 8)
    assert torch.allclose(factored.squared_norms(), dense.squared_norms(), rtol=1e-12)
    index = torch.tensor([0, 5, 11])
    assert torch.allclose(factored.dense_rows(index), dense.rows(index), rtol=1e-12, atol=0)


def test_cg_solves_a_right_hand_side_of_unit_norm():
    # |rhs| = 1 exactly is an ordinary system (only |rhs| = 0 is the trivial one); kills
    # cg.py:67 rhs_norm == 0.0 -> == 1.0
    from natgrad.solvers import cg_solve

    operator, _ = _problem()
    rhs = torch.zeros(operator.num_samples, dtype=torch.float64)
    rhs[2] = 1.0
    result = cg_solve(operator, rhs, 0.1, tol=1e-10, max_iters=100)
    assert result.converged and result.iterations > 0
    assert torch.allclose(result.x, cholesky_solve(operator, rhs, 0.1).x, rtol=1e-8, atol=1e-12)


def test_diagnostics_of_a_solve_take_its_figures_and_compiled_flag():
    # kills results.py:104 (`compiled is None` -> `not compiled is None`)
    import time

    from natgrad.solvers import SolveResult

    zero = torch.zeros(3, dtype=torch.float64)
    result = SolveResult(zero, zero, zero, 1e-9, 7, True, 2e-9, 10.0, 1e-15, True)
    kwargs = dict(solver="cg", backend="materialized", score_path="vmap", fallbacks=["a"],
                  num_samples=3, num_params=3, started=time.perf_counter() - 100.0)  # fmt: skip
    own = Diagnostics.of_solve(result, **kwargs)
    assert own.compiled is True and own.fallbacks == ("a",)
    assert (own.residual, own.iterations, own.direction_error) == (1e-9, 7, 2e-9)
    assert (own.condition, own.precision) == (10.0, 1e-15) and 100.0 <= own.seconds < 110.0
    assert Diagnostics.of_solve(result, **kwargs, compiled=False).compiled is False


@pytest.mark.parametrize("rows", [12, 1])
def test_conditioning_without_a_trace_relies_on_power_iterations(rows):
    """An operator without a cheap trace (the matrix-free expected Fisher) still gets its
    estimate, even at a tolerance the trace bound alone would have met; products that
    overflow give an infinite condition. Kills conditioning.py's ``total is not None``
    guard (``is`` <-> ``is not``, ``not``)."""
    from natgrad.solvers.conditioning import estimate_conditioning

    class NoTrace(MaterializedScores):
        def kernel_trace(self):
            return None

        def squared_norms(self):  # never needed
            raise AssertionError("the rows' norms were read")

    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(rows, 5, generator=gen, dtype=torch.float64)
    scores[:, 0] *= 6.0  # a clear spectral gap: the power iteration converges
    largest = float(torch.linalg.eigvalsh(scores @ scores.T / rows)[-1])
    result = estimate_conditioning(NoTrace(scores), 1e-2, tol=1.0)
    assert result.largest_eigenvalue == pytest.approx(largest, rel=1e-6)
    huge = torch.full((3, 2), 1e300, dtype=torch.float64)
    assert estimate_conditioning(NoTrace(huge), 1e-2, tol=1.0).condition == float("inf")


def test_conditioning_keeps_the_trace_when_the_power_iteration_overflows():
    # a finite trace and products that overflow: the trace bound stands (no refusal);
    # kills conditioning.py's `elif total is None` -> `is not None`
    from natgrad.solvers.conditioning import estimate_conditioning

    class Overflowing(MaterializedScores):
        def matvec(self, v):
            return torch.full((self.num_samples,), float("inf"), dtype=self.dtype)

    scores = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    result = estimate_conditioning(Overflowing(scores), 1e-2, tol=1e-30)
    trace = float((scores**2).sum()) / 3
    assert result.largest_eigenvalue == pytest.approx(trace, rel=1e-12)
    assert result.condition < float("inf")
