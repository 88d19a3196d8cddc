"""The solver options, their defaults (written once) and the named presets.

Every entry point (:class:`~natgrad.RATNaturalGradient`, the supervised API and optimizer,
the RL agents) validates its solver keywords into one :class:`SolverOptions`; its defaults
and the presets :data:`SUPERVISED` and :data:`RL_AGENT` are the only place they are written.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from natgrad._checks import (
    check_bool,
    check_choice,
    check_fraction,
    check_keywords,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
)
from natgrad.solvers.registry import solver_names

__all__ = [
    "ON_NONCONVERGENCE",
    "OPTION_NAMES",
    "RL_AGENT",
    "SUPERVISED",
    "OnNonConvergence",
    "OptionsView",
    "SolverName",
    "SolverOptions",
]

SolverName = Literal["auto", "kaczmarz", "cholesky", "cg", "accelerated_kaczmarz"]
OnNonConvergence = Literal["fallback", "warn", "raise"]
ON_NONCONVERGENCE: tuple[str, ...] = ("fallback", "warn", "raise")


@dataclass(frozen=True)
class SolverOptions:
    """Validated options of the Woodbury solvers; the defaults are ``RATNaturalGradient``'s.

    Every field is checked at construction with an error that names it and the fix. See
    :class:`natgrad.RATNaturalGradient` for the meaning of each; :data:`SUPERVISED` and
    :data:`RL_AGENT` are the other presets.

    Attributes
    ----------
    solver
        ``"auto"`` or a registered solver (``"kaczmarz"``, ``"cholesky"``, ``"cg"``, ...).
    damping
        Tikhonov damping ``lam > 0`` (units of ``F = J^T J / N``).
    block_size
        Kaczmarz block size (and chunk size of the score computation).
    max_epochs
        Kaczmarz sweeps before giving up.
    tol
        Target relative residual and relative direction error, in ``(0, 1)``.
    max_iters
        CG iteration cap.
    on_nonconvergence
        ``"fallback"``, ``"warn"`` or ``"raise"`` when an iterative solver misses ``tol``.
    resample_blocks
        Redraw the Kaczmarz paving every epoch.
    compile
        Run the fused ``torch.compile`` step of the iterative solvers.
    preconditioner_rank
        Rank of CG's Nystrom preconditioner (0 turns it off).
    """

    solver: str = "auto"
    damping: float = 1e-3
    block_size: int = 512
    max_epochs: int = 10
    tol: float = 5e-2
    max_iters: int = 200
    on_nonconvergence: str = "fallback"
    resample_blocks: bool = False
    compile: bool = False
    preconditioner_rank: int = 256

    def __post_init__(self) -> None:
        checked = {
            "solver": check_choice("solver", self.solver, solver_names()),
            "damping": check_positive_float(
                "damping", self.damping, "; typical values are 1e-4..1e-1 (units of F = J^T J / N)"
            ),
            "block_size": check_positive_int("block_size", self.block_size, "; try 512"),
            "max_epochs": check_positive_int("max_epochs", self.max_epochs),
            "tol": check_fraction(
                "tol",
                self.tol,
                " (it is relative: at 1 or more, an error as large as the answer itself "
                "would count as converged); e.g. 1e-2",
            ),
            "max_iters": check_positive_int("max_iters", self.max_iters),
            "on_nonconvergence": check_choice(
                "on_nonconvergence", self.on_nonconvergence, ON_NONCONVERGENCE
            ),
            "resample_blocks": check_bool("resample_blocks", self.resample_blocks),
            "compile": check_bool("compile", self.compile),
            "preconditioner_rank": check_nonnegative_int(
                "preconditioner_rank", self.preconditioner_rank, "; 0 turns it off, e.g. 128"
            ),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> SolverOptions:
        """A copy with ``changes`` applied (validated again)."""
        check_keywords("SolverOptions.replace", changes, OPTION_NAMES)
        return replace(self, **changes)

    def pick(self, values: dict[str, Any]) -> SolverOptions:
        """A copy with the option names found in ``values`` set (other keys are ignored).

        Lets an entry point that lists the solver keywords in its signature forward them
        at once: ``preset.pick(locals())``.
        """
        return replace(self, **{name: values[name] for name in OPTION_NAMES if name in values})

    def keywords(self) -> dict[str, Any]:
        """The options as keyword arguments (of ``RATNaturalGradient`` and the like)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    @classmethod
    def validated(cls, **options: Any) -> SolverOptions:
        """``SolverOptions(**options)``, as natgrad 0.1's ``SolverSettings.validated``."""
        return cls(**options)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(SolverOptions))

# Named presets. The class defaults serve RL updates through RATNaturalGradient (a loose tol
# is cheap and enough for a step); supervised steps want an accurate direction.
SUPERVISED = SolverOptions(
    solver="kaczmarz", block_size=256, max_epochs=50, tol=1e-3, preconditioner_rank=0
)
"""Preset of :func:`~natgrad.supervised.natural_gradient` and the supervised optimizer."""

RL_AGENT = SolverOptions(damping=0.1, block_size=256, max_epochs=20, tol=1e-3)
"""Preset of the ``rat-npg`` and ``rat-trpo`` agents (``natgrad train``)."""


class OptionsView:
    """Read-only attributes (``damping``, ``solver``, ...) of an object's ``options``."""

    options: SolverOptions

    damping = property(lambda self: self.options.damping, doc="Tikhonov damping ``lam``.")
    solver = property(lambda self: self.options.solver, doc="The requested solver.")
    block_size = property(lambda self: self.options.block_size, doc="Kaczmarz block size.")
    max_epochs = property(lambda self: self.options.max_epochs, doc="Kaczmarz epoch cap.")
    tol = property(lambda self: self.options.tol, doc="Relative-residual tolerance.")
    max_iters = property(lambda self: self.options.max_iters, doc="CG iteration cap.")
    on_nonconvergence = property(lambda self: self.options.on_nonconvergence)
    resample_blocks = property(lambda self: self.options.resample_blocks)
    compile = property(lambda self: self.options.compile, doc="Whether the fused path is on.")
    preconditioner_rank = property(lambda self: self.options.preconditioner_rank)

    @property
    def settings(self) -> SolverOptions:
        """Deprecated name of :attr:`options` (natgrad 0.1)."""
        warnings.warn(
            "the .settings attribute is deprecated; use .options", DeprecationWarning, stacklevel=2
        )
        return self.options

    @settings.setter
    def settings(self, options: SolverOptions) -> None:
        warnings.warn(
            "the .settings attribute is deprecated; use .options", DeprecationWarning, stacklevel=2
        )
        self.options = options
