"""The one thing algorithms differ in: how the policy parameters are updated from a batch.

An algorithm is a :class:`PolicyUpdate` subclass with its own options dataclass
(:attr:`PolicyUpdate.Options`), listed under its CLI name in
:data:`natgrad.rl.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from natgrad.distributions import mean_kl
from natgrad.rl.options import AlgorithmOptions, option, positive

__all__ = [
    "PolicyUpdate",
    "TrustRegionOptions",
    "mean_kl",
    "surrogate",
]


def surrogate(log_probs: Tensor, old_log_probs: Tensor, adv: Tensor) -> Tensor:
    """Importance-weighted surrogate ``mean(pi / pi_old * A)``; its gradient at ``pi_old`` is g."""
    return (torch.exp(log_probs - old_log_probs) * adv).mean()


@dataclasses.dataclass
class TrustRegionOptions(AlgorithmOptions):
    """Options of an update whose step is sized by a KL trust region."""

    max_kl: float = option(0.02, "KL trust region of one update.", positive)


class PolicyUpdate(ABC):
    """Updates a policy in place from one on-policy batch.

    Everything else (rollouts, GAE, normalization, critic) is shared by the trainer, so
    algorithms are compared on their update direction and step only.

    Parameters
    ----------
    policy
        The policy to update; ``policy(obs)`` returns a ``torch.distributions`` object.
    options
        The algorithm's options, an instance of :attr:`Options` (``None``: its defaults).
    seed
        Seed of any randomness the update itself uses.
    """

    Options: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions
    """The options dataclass of this algorithm."""

    def __init__(self, policy: nn.Module, options: Any = None, seed: int = 0) -> None:
        self.policy = policy
        self.options = self._coerce(options)
        self.seed = seed

    @classmethod
    def _coerce(cls, options: Any) -> Any:
        if options is None:
            return cls.Options()
        if isinstance(options, cls.Options):
            return options
        if hasattr(options, "options_for"):  # a TrainConfig: natgrad 0.1's signature
            warnings.warn(
                f"{cls.__name__}(policy, config, seed) with a TrainConfig is deprecated; pass "
                f"the algorithm's options: {cls.__name__}(policy, config.options, seed)",
                DeprecationWarning,
                stacklevel=4,
            )
            return options.options_for(cls.Options)
        raise TypeError(
            f"{cls.__name__} takes options of type {cls.Options.__name__} (or None for its "
            f"defaults), got {type(options).__name__}"
        )

    @property
    def config(self) -> Any:
        """Deprecated alias of :attr:`options`."""
        warnings.warn(
            "PolicyUpdate.config is deprecated; use .options (the algorithm's own options)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.options

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters, in ``named_parameters`` order."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    @abstractmethod
    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """Update the policy; return scalar statistics to log.

        A ``"kl_target"`` entry is the KL the step aimed for: the trainer rejects an update
        whose measured KL exceeds ``--kl-reject`` times it.

        Parameters
        ----------
        obs, acts
            Batch of ``N`` observations and actions.
        old_log_probs
            ``log pi_old(a | s)`` at collection time, ``(N,)``.
        adv
            Normalized advantages, ``(N,)``.
        """

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (optimizer moments, RNG, curvature estimates)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore state saved by :meth:`state_dict`."""
