"""The accelerated block Kaczmarz solver: its convergence guarantee, honest stopping, and
where it beats the plain method (its exactness on every architecture is in test_rat.py)."""

from __future__ import annotations

import math

import torch
from cases import CASES, build
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad import RATNaturalGradient
from natgrad.operators import DenseOperator
from natgrad.solvers.accelerated_kaczmarz import accelerated_kaczmarz_solve, momentum_parameter
from natgrad.solvers.kaczmarz import block_factor, kaczmarz_solve


def system(n: int, p: int, damping: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, p, generator=gen, dtype=torch.float64)
    scores *= torch.logspace(0, -3, p, dtype=torch.float64)  # a decaying spectrum
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    matrix = scores @ scores.T / n + damping * torch.eye(n, dtype=torch.float64)
    return DenseOperator(scores), rhs, matrix, torch.linalg.solve(matrix, rhs)


def m_norm2(x: torch.Tensor, matrix: torch.Tensor) -> float:
    return float(x @ matrix @ x)


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(6, 24),
    p=st.integers(2, 30),
    damping=st.floats(0.02, 1.0),
    block_size=st.integers(1, 8),
    epochs=st.integers(1, 3),
    seed=st.integers(0, 2**20),
)
def test_mean_error_obeys_the_accelerated_rate(n, p, damping, block_size, epochs, seed) -> None:
    """E |y_k - x*|_M^2 <= 2 (1 - tau)^k |x*|_M^2 (Tu et al., 2017), k = epochs x blocks,
    checked as a Monte Carlo mean of error / bound over 16 runs (each run's own paving)."""
    operator, rhs, matrix, exact = system(n, p, damping, seed)
    ratios = []
    for run in range(16):
        generator = torch.Generator().manual_seed(run)
        result = accelerated_kaczmarz_solve(
            operator, rhs, damping, block_size, epochs, 0.0, torch.Generator().manual_seed(run)
        )
        blocks = list(torch.randperm(n, generator=generator).split(block_size))
        _, tau = momentum_parameter(
            [block_factor(operator.block(index), n, damping) for index in blocks], damping
        )
        bound = 2.0 * (1.0 - tau) ** (epochs * len(blocks)) * m_norm2(exact, matrix)
        ratios.append(m_norm2(result.x - exact, matrix) / bound)
    assert sum(ratios) / len(ratios) <= 1.5, max(ratios)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 30),
    p=st.integers(1, 30),
    damping=st.floats(1e-3, 10.0),
    block_size=st.integers(1, 40),
    tol=st.sampled_from([1e-2, 1e-6, 1e-10]),
    seed=st.integers(0, 2**20),
)
def test_converged_means_within_tol(n, p, damping, block_size, tol, seed) -> None:
    operator, rhs, matrix, exact = system(n, p, damping, seed)
    result = accelerated_kaczmarz_solve(
        operator, rhs, damping, block_size, 400, tol, torch.Generator().manual_seed(seed)
    )
    residual = float((rhs - matrix @ result.x).norm() / rhs.norm())
    assert math.isclose(result.residual, residual, rel_tol=1e-6, abs_tol=1e-14)
    if result.converged:
        assert residual <= tol * (1 + 1e-9)
        direction = operator.matrix.T @ result.x / n
        truth = operator.matrix.T @ exact / n
        error = float((direction - truth).norm() / truth.norm()) if truth.norm() > 0 else 0.0
        assert error <= result.direction_error * (1 + 1e-9) + 1e-15


def test_one_block_is_one_exact_step() -> None:
    operator, rhs, matrix, exact = system(10, 6, 0.1, 0)
    result = accelerated_kaczmarz_solve(operator, rhs, 0.1, 10, 1, 1e-10, torch.Generator())
    assert result.converged and result.iterations == 1
    assert torch.allclose(result.x, exact, rtol=1e-10, atol=1e-12)


def test_a_large_right_hand_side_converges_to_its_tol() -> None:
    # the stopping rule compares absolute residuals with tol * |rhs|, whatever |rhs| is
    operator, rhs, matrix, exact = system(12, 8, 0.3, 1)
    result = accelerated_kaczmarz_solve(
        operator, 1e3 * rhs, 0.3, 4, 500, 1e-9, torch.Generator().manual_seed(0)
    )
    assert result.converged and result.residual <= 1e-9
    assert torch.allclose(result.x, 1e3 * exact, rtol=1e-6)


def test_zero_right_hand_side_is_zero() -> None:
    operator, rhs, _, _ = system(8, 4, 0.1, 0)
    result = accelerated_kaczmarz_solve(operator, 0 * rhs, 0.1, 3, 5, 1e-6, torch.Generator())
    assert result.converged and result.iterations == 0 and not result.x.any()
    assert result.residual == 0.0 and result.direction_error == 0.0


def test_no_epoch_is_not_converged() -> None:
    operator, rhs, _, _ = system(8, 4, 0.1, 0)
    result = accelerated_kaczmarz_solve(operator, rhs, 0.1, 3, 0, 1e-6, torch.Generator())
    assert not result.converged and result.iterations == 0 and result.residual == 1.0


def test_converges_where_the_plain_method_stalls() -> None:
    # an ill-conditioned system (decaying score spectrum, damping 1e-3): the plain method
    # is still at a relative residual above 1e-8 after 600 epochs, the accelerated one is not
    operator, rhs, _, _ = system(64, 64, 1e-3, 0)
    plain = kaczmarz_solve(operator, rhs, 1e-3, 8, 600, 1e-8, torch.Generator().manual_seed(0))
    fast = accelerated_kaczmarz_solve(
        operator, rhs, 1e-3, 8, 600, 1e-8, torch.Generator().manual_seed(0)
    )
    assert not plain.converged and plain.iterations == 600
    assert fast.converged and fast.iterations < 400


def test_is_a_registered_solver_of_rat() -> None:
    case = next(c for c in CASES if c.name == "gaussian_mlp")
    policy, obs, acts, adv = build(case, 24)
    rat = RATNaturalGradient(case.log_prob_fn, damping=0.5, solver="accelerated_kaczmarz")
    rat(policy, obs, acts, adv)
    assert rat.diagnostics.solver == "accelerated_kaczmarz" and rat.diagnostics.converged
