"""``converged`` is exactly "relative residual <= tol and direction error <= tol"
(cg, accelerated_kaczmarz), and the residual threshold is relative to ``|rhs|``.

Kills the survivors ``and -> or`` in the returned flag (cg.py, accelerated_kaczmarz.py) and
the stopping threshold ``tol * |rhs|`` replaced by ``tol / |rhs|`` (accelerated_kaczmarz.py).
"""

from __future__ import annotations

import torch

from natgrad.operators import DenseOperator
from natgrad.solvers.accelerated_kaczmarz import accelerated_kaczmarz_solve
from natgrad.solvers.cg import cg_solve


def _system(n: int, p: int, scale: float, seed: int) -> tuple[DenseOperator, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scores = scale * torch.randn(n, p, generator=gen, dtype=torch.float64)
    scores *= torch.logspace(0, -4, p, dtype=torch.float64)  # ill-conditioned
    return DenseOperator(scores), torch.randn(n, generator=gen, dtype=torch.float64)


def _stops_of_cg(operator, rhs, damping, tol):
    return [cg_solve(operator, rhs, damping, tol, max_iters=k) for k in range(1, 40)]


def _stops_of_accelerated(operator, rhs, damping, tol):
    return [
        accelerated_kaczmarz_solve(
            operator, rhs, damping, 4, epochs, tol, torch.Generator().manual_seed(0)
        )
        for epochs in range(1, 30)
    ]


def test_converged_needs_both_criteria_when_they_disagree() -> None:
    # sweeps of max_iters / max_epochs on systems where some stops have a relative residual
    # <= tol but a direction error > tol (the reverse cannot happen: the error bound <= tol
    # implies the relative residual <= tol)
    for stops in (
        _stops_of_cg(*_system(40, 60, 1.0, 0), 1e-2, 1e-3),
        _stops_of_accelerated(*_system(40, 60, 0.01, 0), 1e-2, 1e-3),
    ):
        found = 0
        for result in stops:
            residual_ok = result.residual <= 1e-3
            error_ok = result.direction_error <= 1e-3
            assert result.converged == (residual_ok and error_ok)
            found += residual_ok != error_ok
        assert found > 0  # the sweep reaches a stop where only one criterion holds


def test_accelerated_kaczmarz_tolerance_is_relative_to_the_right_hand_side() -> None:
    # |rhs| ~ 1e4: an absolute threshold tol / |rhs| would never be met before max_epochs
    operator, rhs = _system(32, 8, 1.0, 2)
    rhs = 1e3 * rhs
    result = accelerated_kaczmarz_solve(
        operator, rhs, 0.5, 4, 500, 1e-6, torch.Generator().manual_seed(0)
    )
    assert result.converged and result.iterations <= 20
