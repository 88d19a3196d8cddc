"""The one thing algorithms differ in: how the policy parameters are updated from a batch.

An algorithm is a :class:`PolicyUpdate` subclass with its own options dataclass
(:attr:`PolicyUpdate.Options`), listed under its CLI name in
:data:`natgrad.rl.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from natgrad.distributions import kl, mean_kl
from natgrad.errors import ArgumentTypeError
from natgrad.rl.options import AlgorithmOptions, option, positive

__all__ = [
    "PolicyUpdate",
    "TrustRegionOptions",
    "mean_kl",
    "surrogate",
]


def surrogate(
    log_probs: Tensor,
    old_log_probs: Tensor,
    adv: Tensor,
    mean: Callable[[Tensor], Tensor] = torch.mean,
) -> Tensor:
    """Importance-weighted surrogate ``mean(pi / pi_old * A)``; its gradient at ``pi_old`` is g.

    ``mean`` averages the per-sample terms (a data-parallel run passes the global mean).
    """
    return mean(torch.exp(log_probs - old_log_probs) * adv)


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

    Attributes
    ----------
    sample_mean
        Mean of per-sample values (measured KLs, surrogates) over every rank's batch
        after :meth:`use_process_group`; ``None``: over this batch.
    """

    Options: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions
    """The options dataclass of this algorithm."""

    def __init__(self, policy: nn.Module, options: Any = None, seed: int = 0) -> None:
        self.policy = policy
        self.options = self._coerce(options)
        self.seed = seed
        self.sample_mean: Callable[[Tensor], Tensor] | None = None

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
        raise ArgumentTypeError(
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

    def measured_kl(self, old: Distribution, new: Distribution) -> Tensor:
        """Mean ``KL(old || new)`` over the batch (over every rank's, see :attr:`sample_mean`)."""
        if self.sample_mean is None:
            return mean_kl(old, new)
        return self.sample_mean(kl(old, new))

    def use_process_group(self, group: Any, mean: Callable[[Tensor], Tensor]) -> None:
        """Update with the union of the batches of every rank of ``group`` (data parallel).

        Parameters
        ----------
        group
            An initialized ``torch.distributed`` process group.
        mean
            Mean of per-sample values over every rank's samples (becomes
            :attr:`sample_mean`).

        Raises
        ------
        ConfigError
            The algorithm has no data-parallel form (this default).
        """
        from natgrad.rl._errors import ConfigError

        raise ConfigError(
            f"{type(self).__name__} has no data-parallel form: train it without --nproc "
            "(or torchrun), or use --algo rat-npg or rat-trpo"
        )

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (optimizer moments, RNG, curvature estimates)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore state saved by :meth:`state_dict`."""
