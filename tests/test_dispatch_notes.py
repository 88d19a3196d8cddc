"""The solver dispatch's own decisions, each at its boundary: when rounding is refused or
reported (and the fix it suggests), the zero right-hand side, the compiled flag and the
solver choice without a preconditioner (survivors of mutation testing, dispatch.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from natgrad import IllConditionedError, PrecisionWarning, RATNaturalGradient
from natgrad.operators import DenseOperator
from natgrad.solvers.conditioning import Conditioning
from natgrad.solvers.dispatch import _compiled, _precision_notes, resolve_solver
from natgrad.solvers.options import SolverOptions


def _operator(dtype: torch.dtype = torch.float64) -> DenseOperator:
    operator = DenseOperator(torch.ones(4, 3, dtype=torch.float64))
    operator.score_dtype = dtype
    return operator


def _conditioning(precision: float, product_error: float) -> Conditioning:
    return Conditioning(
        condition=100.0, precision=precision, largest_eigenvalue=1.0, product_error=product_error
    )


def test_no_note_while_rounding_stays_within_tol_including_equality() -> None:
    options = SolverOptions(tol=1e-3)
    assert _precision_notes(_operator(), _conditioning(1e-3, 0.5), options) == []


def test_precision_above_tol_warns_even_when_products_are_fine() -> None:
    options = SolverOptions(tol=1e-3)
    with pytest.warns(PrecisionWarning, match="may leave a relative error up to 0.002"):
        notes = _precision_notes(_operator(), _conditioning(2e-3, 0.5), options)
    assert len(notes) == 1


@pytest.mark.parametrize("product_error", [1.0, 1.5])
def test_products_wrong_by_100_percent_or_more_are_refused(product_error: float) -> None:
    with pytest.raises(IllConditionedError, match="wrong by 100% or more"):
        _precision_notes(_operator(), _conditioning(1e-6, product_error), SolverOptions())


def test_the_fix_names_a_damping_and_float64_only_for_lower_precision_scores() -> None:
    options = SolverOptions(tol=1e-3)
    for dtype, float64_hint in ((torch.float64, False), (torch.float32, True)):
        with pytest.warns(PrecisionWarning) as caught:
            _precision_notes(_operator(dtype), _conditioning(2e-3, 0.5), options)
        message = str(caught[0].message)
        expected = Conditioning(100.0, 2e-3, 1.0, 0.5).minimum_damping(
            torch.finfo(torch.float64).eps, torch.finfo(dtype).eps, 1e-3
        )
        assert math.isfinite(expected)
        assert f"use damping >= {expected:.2g}" in message
        assert ("or float64 parameters" in message) == float64_hint


def test_an_unreachable_tol_says_so_instead_of_naming_a_damping() -> None:
    options = SolverOptions(tol=1e-17)
    with pytest.warns(PrecisionWarning, match="below what float64 scores can deliver"):
        _precision_notes(_operator(), _conditioning(1e-15, 1e-15), options)


def test_zero_advantages_are_solved_without_iterating() -> None:
    torch.manual_seed(0)
    policy = torch.nn.Linear(3, 2)

    def log_prob_fn(p, obs, acts):
        return torch.distributions.Categorical(logits=p(obs)).log_prob(acts)

    rat = RATNaturalGradient(log_prob_fn, damping=0.1, solver="cg")
    result = rat.natural_gradient(
        policy, torch.randn(8, 3), torch.randint(0, 2, (8,)), torch.zeros(8)
    )
    diag = result.diagnostics
    assert (diag.residual, diag.iterations, diag.direction_error) == (0.0, 0, 0.0)
    assert diag.precision == 0.0 and diag.condition == 1.0 and diag.converged


def test_compiled_flag_follows_the_solvers_fused_form() -> None:
    operator = _operator()
    compiled, notes = _compiled(operator, SolverOptions(compile=True), "kaczmarz")
    assert compiled and notes == []  # kaczmarz fuses its block step on every backend
    assert _compiled(operator, SolverOptions(compile=False), "kaczmarz") == (False, [])


def test_without_a_preconditioner_rank_cpu_auto_never_solves_exactly() -> None:
    operator = SimpleNamespace(device=torch.device("cpu"), backend="factored", num_samples=1)
    assert resolve_solver("auto", operator) == "cg"  # the default rank is 0
    assert resolve_solver("auto", operator, 0) == "cg"
    assert resolve_solver("auto", operator, 1) == "cholesky"


def test_the_documented_gpu_limit_is_the_one_auto_uses() -> None:
    from pathlib import Path

    from natgrad.solvers.dispatch import AUTO_CHOLESKY_MAX_SAMPLES

    root = Path(__file__).resolve().parent.parent
    assert f"`N <= {AUTO_CHOLESKY_MAX_SAMPLES}`" in (root / "docs/choosing.md").read_text()
    assert f"``N <= {AUTO_CHOLESKY_MAX_SAMPLES}``" in RATNaturalGradient.__doc__


def test_the_direction_offset_is_keyword_only() -> None:
    from natgrad.solvers.dispatch import solve

    operator = _operator()
    with pytest.raises(TypeError):
        solve(
            operator, torch.ones(4, dtype=torch.float64), SolverOptions(), torch.Generator(), None
        )


def test_compile_without_a_fused_form_runs_eagerly_and_says_so() -> None:
    operator = SimpleNamespace(functional=lambda: None, backend="streaming")
    compiled, notes = _compiled(operator, SolverOptions(compile=True), "cg")
    assert not compiled and "has no fused form" in notes[0]


def test_a_loose_tol_aims_the_suggested_damping_at_half() -> None:
    # tol above 0.5: the suggested damping targets a precision of 0.5, not tol itself
    options = SolverOptions(tol=0.8)
    with pytest.warns(PrecisionWarning) as caught:
        _precision_notes(_operator(torch.float32), _conditioning(0.9, 0.5), options)
    expected = _conditioning(0.9, 0.5).minimum_damping(
        torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps, 0.5
    )
    assert f"use damping >= {expected:.2g}" in str(caught[0].message)


def test_a_stop_at_exactly_tol_blames_the_direction_error(monkeypatch) -> None:
    # residual == tol is within tol: the unconverged stop is due to the direction error
    from natgrad.solvers import _base
    from natgrad.solvers import dispatch as dispatch_module
    from natgrad.solvers.registry import SOLVER_REGISTRY, Solver

    def stuck(operator, rhs, options, generator, *, direction_offset=None):
        zero = torch.zeros_like(rhs)
        return _base.SolveResult(zero, zero, zero, options.tol, 3, False, 2 * options.tol)

    monkeypatch.setitem(SOLVER_REGISTRY, "stuck", Solver("stuck", stuck))
    options = SolverOptions(tol=0.25, on_nonconvergence="raise")
    from natgrad import NotConvergedError

    with pytest.raises(NotConvergedError, match="direction error bound 0.5 > tol=0.25"):
        dispatch_module._solve_unit(
            _operator(), torch.ones(4, dtype=torch.float64), options, torch.Generator(), "stuck",
            None,
        )  # fmt: skip
