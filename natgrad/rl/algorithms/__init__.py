"""Policy-update rules, by CLI name. Adding an algorithm is one line in :data:`ALGORITHMS`."""

from __future__ import annotations

from torch import nn

from natgrad.rl.algorithms.base import PolicyUpdate, mean_kl, surrogate
from natgrad.rl.algorithms.kfac import KFAC
from natgrad.rl.algorithms.linesearch import LineSearchResult, backtracking_line_search
from natgrad.rl.algorithms.ppo import PPO
from natgrad.rl.algorithms.rat import RatNPG, RatTRPO
from natgrad.rl.algorithms.trpo import CGTRPO, conjugate_gradient
from natgrad.rl.algorithms.vanilla import VanillaPG
from natgrad.rl.config import TrainConfig

ALGORITHMS: dict[str, type[PolicyUpdate]] = {
    "rat-npg": RatNPG,
    "rat-trpo": RatTRPO,
    "cg-trpo": CGTRPO,
    "kfac": KFAC,
    "vpg": VanillaPG,
    "a2c": VanillaPG,
    "ppo": PPO,
}

__all__ = [
    "ALGORITHMS",
    "CGTRPO",
    "KFAC",
    "PPO",
    "LineSearchResult",
    "PolicyUpdate",
    "RatNPG",
    "RatTRPO",
    "VanillaPG",
    "backtracking_line_search",
    "conjugate_gradient",
    "make_algorithm",
    "mean_kl",
    "surrogate",
]


def make_algorithm(name: str, policy: nn.Module, config: TrainConfig, seed: int) -> PolicyUpdate:
    """Instantiate the update rule registered as ``name``."""
    from natgrad.rl._errors import ConfigError

    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](policy, config, seed)
