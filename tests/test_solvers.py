"""Solver invariants on random problems (hypothesis) and the shared solver contract."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.scores import DenseBlock, MaterializedScores
from natgrad.solvers import (
    SOLVER_REGISTRY,
    KaczmarzState,
    SolverOptions,
    block_factor,
    cg_solve,
    cholesky_solve,
    kaczmarz_solve,
    kaczmarz_step,
)
from natgrad.solvers.dispatch import resolve_solver, solve
from natgrad.solvers.nystrom import nystrom_preconditioner


@st.composite
def problems(draw, min_damping=1e-3, normalized=False):
    """Random J (possibly rank-deficient, with duplicated rows), rhs, block size, damping.

    ``normalized`` scales J so that the largest eigenvalue of K / N is one, which bounds
    the condition number of K / N + lam I by 1 + 1 / lam (Kaczmarz needs O(cond) sweeps).
    """
    n = draw(st.integers(2, 24))
    p = draw(st.integers(1, 30))
    rank = draw(st.integers(1, min(n, p)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    scores = left @ torch.randn(rank, p, generator=gen, dtype=torch.float64)
    duplicates = draw(st.integers(0, n // 2))
    if duplicates:
        scores[:duplicates] = scores[n - duplicates :]
    scores *= draw(st.floats(0.1, 10.0))
    if normalized:
        top = float(torch.linalg.matrix_norm(scores, ord=2)) / n**0.5
        scores /= max(top, 1e-12)
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    block = draw(st.integers(1, n))
    damping = draw(st.floats(min_damping, 1.0))
    return MaterializedScores(scores), rhs, block, damping, seed


def system(op, damping):
    matrix = op.gram() / op.num_samples
    return matrix + damping * torch.eye(op.num_samples, dtype=torch.float64)


def energy(matrix, error):
    return float(error @ matrix @ error)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_energy_error_never_increases(problem):
    op, rhs, block, damping, seed = problem
    matrix = system(op, damping)
    exact = torch.linalg.solve(matrix, rhs)
    state = KaczmarzState.zeros(op, rhs.device)
    gen = torch.Generator().manual_seed(seed)
    previous = energy(matrix, state.x - exact)
    for _ in range(3 * (op.num_samples // block + 1)):
        index = torch.randperm(op.num_samples, generator=gen)[:block]
        kaczmarz_step(state, op.block(index), index, rhs, damping)
        current = energy(matrix, state.x - exact)
        assert current <= previous * (1 + 1e-9) + 1e-12
        previous = current
        # v = J^T x / N is maintained exactly along the way.
        assert torch.allclose(state.v, op.rmatvec(state.x) / op.num_samples, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(problems(min_damping=1e-2))
def test_expected_contraction_respects_sketch_and_project_bound(problem):
    """E ||e+||_M^2 <= (1 - lambda_min(E[Z])) ||e||_M^2 (Gower & Richtarik 2015, Thm 4.6).

    Blocks are drawn uniformly from a fixed paving; E[Z] = mean_S M^{1/2} I_S M_SS^{-1}
    I_S^T M^{1/2}. The expectation is computed exactly by enumerating the paving.
    """
    op, rhs, block, damping, seed = problem
    n = op.num_samples
    matrix = system(op, damping)
    exact = torch.linalg.solve(matrix, rhs)
    gen = torch.Generator().manual_seed(seed)
    paving = list(torch.randperm(n, generator=gen).split(block))
    evals, evecs = torch.linalg.eigh(matrix)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    expected_z = torch.zeros(n, n, dtype=torch.float64)
    for index in paving:
        columns = root[:, index]
        expected_z += columns @ torch.linalg.solve(matrix[index][:, index], columns.T)
    expected_z /= len(paving)
    rate = 1.0 - float(torch.linalg.eigvalsh(expected_z)[0])
    assert -1e-12 <= rate < 1.0  # rate 0 when one block covers all samples

    x0 = torch.randn(n, generator=gen, dtype=torch.float64)
    before = energy(matrix, x0 - exact)
    after = 0.0
    for index in paving:
        state = KaczmarzState(x=x0.clone(), v=op.rmatvec(x0) / n)
        kaczmarz_step(state, op.block(index), index, rhs, damping)
        after += energy(matrix, state.x - exact) / len(paving)
    # rate is 0 up to rounding (-1e-15) when one block covers all samples: clamp it there.
    assert after <= max(rate, 0.0) * before * (1 + 1e-8) + 1e-12


@settings(max_examples=40, deadline=None)
@given(problems(min_damping=5e-2, normalized=True))
def test_kaczmarz_converges_to_cholesky_solution(problem):
    op, rhs, block, damping, seed = problem
    exact = cholesky_solve(op, rhs, damping)
    result = kaczmarz_solve(
        op, rhs, damping, block, 5000, 1e-11, torch.Generator().manual_seed(seed)
    )
    assert result.converged and result.residual <= 1e-11
    assert torch.allclose(result.x, exact.x, rtol=1e-8, atol=1e-9 * float(exact.x.abs().max()))


@settings(max_examples=40, deadline=None)
@given(problems())
def test_design_identities_hold_for_exact_solution(problem):
    op, rhs, _, damping, _ = problem
    n = op.num_samples
    result = cholesky_solve(op, rhs, damping)
    scores = op.matrix
    d = scores.T @ result.x / n
    fisher = scores.T @ scores / n
    g = scores.T @ rhs / n
    jd = rhs - damping * result.x
    assert torch.allclose(scores @ d, jd, atol=1e-9 * (1 + float(rhs.abs().max())))
    assert torch.allclose(result.jv, jd, atol=1e-9 * (1 + float(rhs.abs().max())))
    assert float(g @ d) == pytest.approx(float(rhs @ jd) / n, rel=1e-7, abs=1e-10)
    assert float(d @ fisher @ d) == pytest.approx(float(jd @ jd) / n, rel=1e-7, abs=1e-10)
    # and d solves the primal system
    primal = fisher + damping * torch.eye(scores.shape[1], dtype=torch.float64)
    assert torch.allclose(primal @ d, g, atol=1e-9 * (1 + float(g.abs().max())))


def registered(name):
    """Solver ``name`` of the registry, through its one signature (plain CG, blocks of 4)."""

    def run(op, rhs, lam, tol):
        options = SolverOptions(
            solver=name, damping=lam, tol=tol, max_iters=500, block_size=4, max_epochs=5000,
            preconditioner_rank=0,
        )  # fmt: skip
        return SOLVER_REGISTRY[name].solve(op, rhs, options, torch.Generator().manual_seed(0))

    return run


# Every registered solver passes the same contract: adding one adds it here.
SOLVERS = {name: registered(name) for name in SOLVER_REGISTRY}


@pytest.mark.parametrize("name", list(SOLVERS))
@settings(max_examples=25, deadline=None)
@given(problem=problems(min_damping=5e-2, normalized=True))
def test_solver_contract(name, problem):
    """Every solver returns x with M x = rhs to tol, v = J^T x / N (if formed), jv = J v."""
    op, rhs, _, damping, _ = problem
    result = SOLVERS[name](op, rhs, damping, 1e-10)
    n = op.num_samples
    matrix = system(op, damping)
    assert result.converged
    residual = float(
        torch.linalg.vector_norm(rhs - matrix @ result.x) / torch.linalg.vector_norm(rhs)
    )
    assert residual <= 1e-9
    assert result.residual == pytest.approx(residual, rel=1e-3, abs=1e-12)
    v = op.rmatvec(result.x) / n
    if result.v is not None:
        assert torch.allclose(result.v, v, atol=1e-9)
    assert torch.allclose(result.jv, op.matvec(v), atol=1e-8 * (1 + float(rhs.abs().max())))


def test_zero_rhs_gives_zero_solution():
    op = MaterializedScores(torch.randn(6, 4, dtype=torch.float64))
    rhs = torch.zeros(6, dtype=torch.float64)
    for run in SOLVERS.values():
        result = run(op, rhs, 0.1, 1e-8)
        assert torch.count_nonzero(result.x) == 0 and result.converged


@pytest.mark.parametrize("name", ["auto", *SOLVERS])
def test_zero_scores_give_rhs_over_damping_with_finite_diagnostics(name):
    """J = 0: M = lam I, x = rhs / lam, v = 0. The iterative solvers' bound on the relative
    error of v = 0 was infinite, so solve() raised NotConvergedError (on_nonconvergence)."""
    op = MaterializedScores(torch.zeros(12, 5, dtype=torch.float64))
    rhs = 1e3 * torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = SolverOptions(solver=name, damping=0.1, tol=1e-10, on_nonconvergence="raise")
    result, used, notes = solve(op, rhs, options, torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.x, rhs / 0.1, rtol=4e-16, atol=0)
    assert torch.count_nonzero(result.v) == 0 and torch.count_nonzero(result.jv) == 0
    assert result.converged and used == resolve_solver(name, op, options.preconditioner_rank)
    assert result.residual <= 1e-15 and result.condition == 1.0
    assert result.direction_error == (None if used == "cholesky" else 0.0)
    assert len(notes) == (used != "cholesky")


def test_block_larger_than_batch_is_one_exact_step():
    gen = torch.Generator().manual_seed(1)
    op = MaterializedScores(torch.randn(10, 7, generator=gen, dtype=torch.float64))
    rhs = torch.randn(10, generator=gen, dtype=torch.float64)
    result = kaczmarz_solve(op, rhs, 1e-3, 64, 1, 1e-10, gen)
    assert result.iterations == 1 and result.converged


def test_same_seed_same_numbers():
    gen = torch.Generator().manual_seed(3)
    op = MaterializedScores(torch.randn(40, 12, generator=gen, dtype=torch.float64))
    rhs = torch.randn(40, generator=gen, dtype=torch.float64)
    first = kaczmarz_solve(op, rhs, 1e-2, 8, 3, 1e-12, torch.Generator().manual_seed(7))
    second = kaczmarz_solve(op, rhs, 1e-2, 8, 3, 1e-12, torch.Generator().manual_seed(7))
    other = kaczmarz_solve(op, rhs, 1e-2, 8, 3, 1e-12, torch.Generator().manual_seed(8))
    assert torch.equal(first.x, second.x)
    assert not torch.equal(first.x, other.x)


def test_block_factor_is_cholesky_of_diagonal_block():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    factor = block_factor(DenseBlock(rows), 20, 0.3)
    assert torch.allclose(
        factor @ factor.T, rows @ rows.T / 20 + 0.3 * torch.eye(5, dtype=torch.float64)
    )


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(1, 24))
def test_nystrom_preconditioner_is_symmetric_positive_definite(problem, rank):
    """P^{-1} must be SPD for preconditioned CG to be CG: symmetric, positive on any y."""
    op, _, _, damping, seed = problem
    apply = nystrom_preconditioner(op, damping, rank, torch.Generator().manual_seed(seed))
    assert apply is not None
    n = op.num_samples
    inverse = torch.stack([apply(e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(
        inverse, inverse.T, rtol=1e-6, atol=1e-8 * float(inverse.abs().max())
    )
    assert float(torch.linalg.eigvalsh((inverse + inverse.T) / 2).min()) > 0


@settings(max_examples=60, deadline=None)
@given(problems(normalized=True), st.integers(1, 24))
def test_preconditioned_cg_converges_to_cholesky_solution(problem, rank):
    op, rhs, _, damping, seed = problem
    exact = cholesky_solve(op, rhs, damping).x
    apply = nystrom_preconditioner(op, damping, rank, torch.Generator().manual_seed(seed))
    result = cg_solve(op, rhs, damping, tol=1e-10, max_iters=500, preconditioner=apply)
    # Converged, or stopped at rounding level where the direction-error bound cannot certify
    # 1e-10 (found by hypothesis: residual 2.6e-14, bound 1.9e-10 at damping 1e-3)
    assert result.converged or result.residual <= 1e-12
    assert torch.linalg.vector_norm(result.x - exact) <= 1e-7 * max(
        1.0, float(torch.linalg.vector_norm(exact))
    )


def test_nystrom_preconditioner_cuts_cg_iterations_on_a_decaying_spectrum():
    """A few dozen large eigenvalues of K (scores near a low-rank subspace) slow CG down;
    a rank-64 Nystrom preconditioner takes them out."""
    gen = torch.Generator().manual_seed(0)
    n, p, k = 400, 300, 40
    decay = 0.8 ** torch.arange(k, dtype=torch.float64)
    left = torch.randn(n, k, generator=gen, dtype=torch.float64) * decay * 10
    scores = left @ torch.randn(k, p, generator=gen, dtype=torch.float64)
    scores += 0.01 * torch.randn(n, p, generator=gen, dtype=torch.float64)
    op = MaterializedScores(scores)
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    plain = cg_solve(op, rhs, 1e-3, tol=1e-8, max_iters=1000)
    apply = nystrom_preconditioner(op, 1e-3, 64, torch.Generator().manual_seed(1))
    fast = cg_solve(op, rhs, 1e-3, tol=1e-8, max_iters=1000, preconditioner=apply)
    assert plain.converged and fast.converged
    assert fast.iterations * 3 <= plain.iterations


def test_nystrom_is_exact_when_the_columns_span_a_low_rank_kernel():
    """rank(K) = P < r: the sampled columns span range(K), so P = K / N + lam I exactly
    and preconditioned CG is done in one or two iterations (a singular W must not make
    the preconditioner give up)."""
    gen = torch.Generator().manual_seed(0)
    n, p = 600, 100
    op = MaterializedScores(torch.randn(n, p, generator=gen, dtype=torch.float64))
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    apply = nystrom_preconditioner(op, 1e-3, 256, torch.Generator().manual_seed(1))
    assert apply is not None
    result = cg_solve(op, rhs, 1e-3, tol=1e-8, max_iters=100, preconditioner=apply)
    assert result.converged and result.iterations <= 2


def test_rank_at_least_n_gives_the_exact_inverse():
    """rank >= N uses every sample: P = K / N + lam I, so one CG step is the exact solve.

    (A second step may follow: the stopping rule also bounds the direction's error, which
    the rounding left by the first step can exceed at tol=1e-9.)"""
    gen = torch.Generator().manual_seed(3)
    op = MaterializedScores(torch.randn(40, 300, generator=gen, dtype=torch.float64))
    rhs = torch.randn(40, generator=gen, dtype=torch.float64)
    apply = nystrom_preconditioner(op, 1e-4, 256, torch.Generator().manual_seed(0))
    one = cg_solve(op, rhs, 1e-4, tol=1e-9, max_iters=1, preconditioner=apply)
    assert one.residual <= 1e-9
    result = cg_solve(op, rhs, 1e-4, tol=1e-9, max_iters=50, preconditioner=apply)
    assert result.converged and result.iterations <= 2


def test_float32_near_duplicate_samples_keep_the_preconditioner_positive_definite():
    """float32 Gram entries of near-duplicate samples are not exactly PSD; the shift of W
    keeps lam * P^{-1} within (0, 1] and the preconditioner helps instead of hurting."""
    gen = torch.Generator().manual_seed(0)
    n, p, k, lam = 400, 500, 300, 1e-5
    base = torch.randn(k, p, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, k, (n,), generator=gen)
    noise = 1e-4 * torch.randn(n, p, generator=gen, dtype=torch.float64)
    op = MaterializedScores(((base[pick] + noise) / 5).float())
    apply = nystrom_preconditioner(op, lam, 256, torch.Generator().manual_seed(0))
    inverse = torch.stack([apply(e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    values = torch.linalg.eigvalsh((inverse + inverse.T) / 2 * lam)
    assert float(values.min()) > 0 and float(values.max()) <= 1 + 1e-9
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    # tol within what float32 products support here (the direction-error bound of a
    # converged solve must hold): cond(M) ~ 4e4
    plain = cg_solve(op, rhs, lam, tol=5e-2, max_iters=500)
    fast = cg_solve(op, rhs, lam, tol=5e-2, max_iters=500, preconditioner=apply)
    assert fast.converged and fast.iterations < plain.iterations
