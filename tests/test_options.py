"""SolverOptions: defaults written once, presets, validation, deprecated 0.1 spellings."""

from __future__ import annotations

import pytest

from natgrad import RATNaturalGradient
from natgrad.solvers import RL_AGENT, SUPERVISED, SolverOptions, solver_names
from natgrad.supervised import NaturalGradientOptimizer, SupervisedNaturalGradient


def test_entry_points_take_their_defaults_from_the_options():
    assert RATNaturalGradient().options == SolverOptions()
    assert SupervisedNaturalGradient().options == SUPERVISED
    assert RATNaturalGradient.from_options(RL_AGENT).options == RL_AGENT


def test_optimizer_forwards_every_solver_keyword():
    from torch import nn

    opt = NaturalGradientOptimizer(nn.Linear(2, 1), tol=1e-4, preconditioner_rank=7)
    assert opt.transform.options == SUPERVISED.replace(tol=1e-4, preconditioner_rank=7)


def test_options_are_validated_with_the_registered_names():
    with pytest.raises(ValueError, match="solver must be one of 'auto', 'kaczmarz'"):
        SolverOptions(solver="lbfgs")
    with pytest.raises(TypeError, match="resample_blocks must be True or False"):
        SolverOptions(resample_blocks=1)
    assert solver_names()[:4] == ("auto", "kaczmarz", "cholesky", "cg")


def test_deprecated_spellings_warn_and_still_work():
    import natgrad.solvers

    with pytest.warns(DeprecationWarning, match="SolverOptions"):
        settings_class = natgrad.solvers.SolverSettings
    assert settings_class.validated(damping=0.5).damping == 0.5
    rat = RATNaturalGradient(damping=0.2)
    with pytest.warns(DeprecationWarning, match=r"\.options"):
        assert rat.settings is rat.options


def test_replace_refuses_an_unknown_option_and_names_the_closest():
    from natgrad.errors import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match=r"'dampng' \(did you mean 'damping'\?\)"):
        SolverOptions().replace(dampng=0.1)
    assert SolverOptions().replace(damping=0.1).damping == 0.1
    with pytest.raises(ValueError, match="damping"):  # values are validated again
        SolverOptions().replace(damping=-1.0)
