"""Policy-update rules, by CLI name.

Each algorithm is one module: a :class:`PolicyUpdate` subclass and its options dataclass.
Adding one is that module plus its line in :data:`ALGORITHMS` (see docs/contributing.md).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from natgrad.rl.algorithms.base import PolicyUpdate, TrustRegionOptions, mean_kl, surrogate
from natgrad.rl.algorithms.kfac import KFAC, KFACOptions
from natgrad.rl.algorithms.linesearch import (
    LineSearchOptions,
    LineSearchResult,
    backtracking_line_search,
)
from natgrad.rl.algorithms.ppo import PPO, PPOOptions
from natgrad.rl.algorithms.rat import RatNPG, RatNPGOptions, RatOptions, RatTRPO, RatTRPOOptions
from natgrad.rl.algorithms.trpo import CGTRPO, CGTRPOOptions, conjugate_gradient
from natgrad.rl.algorithms.vanilla import VanillaPG, VanillaPGOptions

ALGORITHMS: dict[str, type[PolicyUpdate]] = {
    "rat-npg": RatNPG,
    "rat-trpo": RatTRPO,
    "cg-trpo": CGTRPO,
    "kfac": KFAC,
    "vpg": VanillaPG,
    "a2c": VanillaPG,
    "ppo": PPO,
}
"""Update rules by ``--algo`` name; each class names its options dataclass as ``Options``."""

__all__ = [
    "ALGORITHMS",
    "CGTRPO",
    "CGTRPOOptions",
    "KFAC",
    "KFACOptions",
    "PPO",
    "PPOOptions",
    "LineSearchOptions",
    "LineSearchResult",
    "PolicyUpdate",
    "RatNPG",
    "RatNPGOptions",
    "RatOptions",
    "RatTRPO",
    "RatTRPOOptions",
    "TrustRegionOptions",
    "VanillaPG",
    "VanillaPGOptions",
    "backtracking_line_search",
    "conjugate_gradient",
    "make_algorithm",
    "mean_kl",
    "surrogate",
]


def make_algorithm(name: str, policy: nn.Module, options: Any, seed: int) -> PolicyUpdate:
    """Instantiate the update rule registered as ``name`` with its ``options``.

    ``options`` is the algorithm's options object, or ``None`` for its defaults (a
    :class:`~natgrad.rl.TrainConfig` still works, deprecated).
    """
    from natgrad.rl._errors import ConfigError

    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](policy, options, seed)
