"""Errors of :mod:`natgrad.sb3` and the refusal of ``sb3_contrib.TRPO``-only keywords."""

from __future__ import annotations

from typing import Any

from natgrad.errors import ArgumentError, NatgradError

__all__ = [
    "REFUSED_KEYWORDS",
    "InvalidArgumentError",
    "UnsupportedArgumentError",
    "refuse_keywords",
]


class UnsupportedArgumentError(NatgradError, TypeError):
    """A keyword of ``sb3_contrib.TRPO`` (or an unknown one) that RAT algorithms do not take.

    The message names the argument, why it has no meaning here and what to pass instead.
    """


# TRPO keyword -> why RAT has no such thing and what to use instead.
REFUSED_KEYWORDS: dict[str, str] = {
    "cg_max_steps": (
        "RAT does not run conjugate gradient on Hessian-vector products: it solves the N x N "
        "sample-space system to the accuracy `tol`; remove cg_max_steps (use tol=..., "
        "max_iters=... or solver='cholesky' to control the solve)"
    ),
    "cg_damping": (
        "RAT's Tikhonov damping of (F + lam I) d = g is the keyword `damping` (same role, in "
        "units of the per-sample Fisher F); rename cg_damping=<value> to damping=<value>"
    ),
}


def refuse_keywords(algorithm: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedArgumentError` for any keyword left in ``kwargs``."""
    if not kwargs:
        return
    name = sorted(kwargs, key=lambda key: (key not in REFUSED_KEYWORDS, key))[0]
    if name in REFUSED_KEYWORDS:
        raise UnsupportedArgumentError(
            f"{algorithm} got {name}={kwargs[name]!r}, a keyword of sb3_contrib.TRPO: "
            f"{REFUSED_KEYWORDS[name]}"
        )
    raise UnsupportedArgumentError(
        f"{algorithm} got an unexpected keyword argument {name!r}; see help({algorithm}) for "
        "its keywords (TRPO's, plus RAT's damping, solver, tol, block_size, max_epochs, "
        "max_iters, preconditioner_rank and rat_kwargs)"
    )


class InvalidArgumentError(ArgumentError):
    """A keyword of a RAT algorithm has a value it cannot train with; the message says why."""
