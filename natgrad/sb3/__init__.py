"""Stable-Baselines3 integration: ``RATTRPO`` and ``RATNPG``, drop-in for ``sb3_contrib.TRPO``.

Both are SB3 on-policy algorithms (``learn``, ``save``, ``load``, ``predict``, callbacks,
TensorBoard) whose policy step is the Tikhonov-damped natural gradient
``d = (F + lam I)^{-1} g`` from :class:`natgrad.RATNaturalGradient` instead of conjugate
gradient on Hessian-vector products. ``RATTRPO`` backtracks on KL and surrogate like
TRPO; ``RATNPG`` takes the closed-form KL step. ``python -m natgrad.sb3.zoo`` runs them
through rl-zoo3. Requires the ``sb3`` extra (``pip install "natgrad[sb3]"``).
"""

from __future__ import annotations

try:
    import stable_baselines3  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from natgrad.errors import MissingExtraError

    raise MissingExtraError("natgrad.sb3", "sb3", "stable-baselines3") from error

from natgrad.sb3._errors import UnsupportedArgumentError
from natgrad.sb3.rat_npg import RATNPG
from natgrad.sb3.rat_trpo import RATTRPO

__all__ = ["RATNPG", "RATTRPO", "UnsupportedArgumentError"]
