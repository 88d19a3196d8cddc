"""TorchRL integration: natural policy gradients from TorchRL's own losses.

:class:`RATAdvantage` is a TensorDict module placed between the advantage estimator (e.g.
``torchrl.objectives.value.GAE``) and a policy-gradient loss (``ReinforceLoss``,
``A2CLoss``). It replaces the advantages ``A`` of the whole batch by
``A~ = (J J^T / N + lam I)^{-1} A``, so the loss's ordinary backward pass gives the
damped natural gradient ``(F + lam I)^{-1} g`` for the actor's parameters. Requires the
``torchrl`` extra (``pip install "natgrad[torchrl]"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from math import inf
from typing import Any

from torch import Tensor, nn

from natgrad import distributions
from natgrad._checks import check_keywords, is_real
from natgrad.errors import ArgumentError, ArgumentTypeError
from natgrad.rat import RATNaturalGradient
from natgrad.results import Diagnostics, NaturalGradient
from natgrad.solvers import RL_AGENT, SolverOptions
from natgrad.solvers.options import OPTION_NAMES

try:
    from tensordict import TensorDict, TensorDictBase
    from tensordict.nn import TensorDictModuleBase
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from natgrad.errors import MissingExtraError

    raise MissingExtraError("natgrad.torchrl", "torchrl", "tensordict") from error

__all__ = ["RATAdvantage"]

NestedKey = str | tuple[str, ...]

# RATAdvantage's own keywords; every other keyword must be a solver option (OPTION_NAMES).
_OWN_KEYWORDS = ("options", "seed", "advantage_key", "action_key", "out_key", "max_kl", "params")


def _check_overrides(overrides: dict[str, Any]) -> None:
    """Refuse a keyword that is neither RATAdvantage's own nor a solver option."""
    check_keywords(
        "RATAdvantage",
        overrides,
        (*OPTION_NAMES, *_OWN_KEYWORDS),
        f"besides its own keywords ({', '.join(_OWN_KEYWORDS)}) it takes the solver keywords "
        f"({', '.join(OPTION_NAMES)})",
    )


class RATAdvantage(TensorDictModuleBase):
    r"""Rewrite a batch's advantages so a TorchRL policy-gradient loss takes a natural step.

    For the ``N`` samples of a batch (every batch dimension flattened) with scores
    ``psi_i = grad log pi(a_i | s_i)`` over the actor's parameters stacked in ``J``
    (``N x P``), it writes ``A~ = (J J^T / N + lam I)^{-1} A`` to the advantage key. The
    gradient of ``mean(A~ * log pi)`` -- the objective of ``ReinforceLoss`` and of
    ``A2CLoss`` without entropy bonus -- is then the Tikhonov-damped natural gradient
    ``d = (F + lam I)^{-1} g``, ``F = J^T J / N``, ``g = J^T A / N``, computed as an
    ``N x N`` solve (Woodbury) instead of a ``P x P`` one. Place it after the advantage
    module and before the loss; the loss, the optimizer and the critic are untouched.

    Parameters
    ----------
    actor
        The probabilistic actor the loss differentiates (a
        ``tensordict.nn.ProbabilisticTensorDictSequential`` such as
        ``torchrl.modules.ProbabilisticActor``): ``actor.get_dist(td)`` gives the action
        distribution. Its parameters are read, never modified.
    options
        Solver options of the transform (damping ``lam`` in units of ``F``, solver,
        tolerance, ...); defaults to :data:`natgrad.solvers.RL_AGENT`
        (``damping=0.1``, as ``natgrad train``).
    seed
        Seed of the transform's generator (block sampling, preconditioner sample); the
        same seed gives the same numbers. ``None`` seeds from the operating system.
    advantage_key
        Key holding the advantages ``A`` (as written by ``GAE``), shaped like the batch,
        optionally with one trailing dimension of size 1.
    action_key
        Key of the actions whose log-probability the loss takes.
    out_key
        Key to write ``A~`` to; ``None`` (the default) overwrites ``advantage_key``, which
        is what the losses read.
    max_kl
        ``None`` (the default) writes ``A~`` itself. A target KL divergence writes
        ``eta * A~`` with ``eta = sqrt(2 max_kl / d^T F d)`` instead, so one plain SGD step
        with ``lr=1`` on the loss is the natural-gradient step whose quadratic KL model
        equals ``max_kl`` (no line search); ``step_size`` records ``eta``.
    params
        Parameters the Fisher is taken over; ``None`` means every trainable parameter of
        ``actor`` (pass a subset when the actor shares a trunk with the critic).
    **overrides
        Solver keywords replacing those of ``options`` (e.g. ``damping=0.05``); any other
        keyword raises :class:`~natgrad.errors.ArgumentTypeError` naming the closest valid one.

    Attributes
    ----------
    rat
        The :class:`~natgrad.RATNaturalGradient` doing the transform.
    diagnostics
        :class:`~natgrad.Diagnostics` of the latest call (``None`` before the first).
    step_size
        ``eta`` of the latest call with ``max_kl`` set, else ``None``.

    Examples
    --------
    Between ``GAE`` and an ``A2CLoss`` (see the TorchRL page of the docs for a whole
    training loop)::

        rat = RATAdvantage(actor, damping=0.1)
        for data in collector:
            gae(data)
            rat(data)  # data["advantage"] <- A~
            loss = loss_module(data)
    """

    def __init__(
        self,
        actor: nn.Module,
        options: SolverOptions = RL_AGENT,
        seed: int | None = 0,
        *,
        advantage_key: NestedKey = "advantage",
        action_key: NestedKey = "action",
        out_key: NestedKey | None = None,
        max_kl: float | None = None,
        params: Iterable[Tensor] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if not callable(getattr(actor, "get_dist", None)):
            raise ArgumentTypeError(
                "actor must be a probabilistic TensorDict module with get_dist(td) (e.g. "
                f"torchrl.modules.ProbabilisticActor), got {type(actor).__name__}; wrap the "
                "network in ProbabilisticActor(module, in_keys=[...], distribution_class=...)"
            )
        if not isinstance(options, SolverOptions):
            raise ArgumentTypeError(
                "options must be a natgrad.solvers.SolverOptions (e.g. "
                f"RL_AGENT.replace(damping=0.05)), got {type(options).__name__}"
            )
        if max_kl is not None and not (is_real(max_kl) and 0 < max_kl < inf):  # not a bool
            raise ArgumentError(
                f"max_kl must be a finite float > 0 or None, got {max_kl!r}; typical values "
                "are 0.005..0.05"
            )
        self.actor = actor
        self.max_kl = max_kl
        self.step_size: float | None = None
        self.advantage_key = advantage_key
        self.action_key = action_key
        self.out_key = advantage_key if out_key is None else out_key
        self.params = None if params is None else list(params)
        _check_overrides(overrides)
        self.rat = RATNaturalGradient.from_options(
            options.replace(**overrides), self._log_prob, seed=seed
        )
        self.in_keys = [*actor.in_keys, action_key, advantage_key]
        self.out_keys = [self.out_key]

    @property
    def diagnostics(self) -> Diagnostics | None:
        return self.rat.diagnostics

    def _log_prob(self, actor: nn.Module, obs: dict[NestedKey, Tensor], acts: Tensor) -> Tensor:
        td = TensorDict(obs, batch_size=acts.shape[:1])
        return distributions.log_prob(actor.get_dist(td), acts)

    def _batch(self, tensordict: TensorDictBase) -> tuple[dict, Tensor, Tensor]:
        if not isinstance(tensordict, TensorDictBase):
            raise ArgumentTypeError(
                "RATAdvantage must be called on a TensorDict (the batch of a collector), got "
                f"{type(tensordict).__name__}; wrap it in TensorDict(..., batch_size=[N])"
            )
        present = tensordict.keys(include_nested=True)
        roles = {key: "an actor input key" for key in self.actor.in_keys}
        roles.update({self.action_key: "action_key", self.advantage_key: "advantage_key"})
        missing = [f"{key!r} ({role})" for key, role in roles.items() if key not in present]
        if missing:
            raise ArgumentError(
                f"RATAdvantage needs {', '.join(missing)} in the tensordict, which has the "
                f"keys {sorted(map(str, tensordict.keys()))}; run the advantage module (e.g. "
                "GAE) first, or pass advantage_key=/action_key= naming yours"
            )
        if tensordict.batch_size.numel() == 0:  # TensorDict.numel() says 1 here
            raise ArgumentError(
                f"the tensordict holds no samples (batch size {tuple(tensordict.batch_size)}): "
                "RATAdvantage needs at least one; call it on a non-empty batch (e.g. skip "
                "empty collector batches)"
            )
        flat = tensordict.reshape(-1)
        adv = flat.get(self.advantage_key)
        if adv.dim() > 1 and adv.shape[1:].numel() != 1:
            raise ArgumentError(
                f"advantage {self.advantage_key!r} must hold one value per sample (batch shape "
                f"{tuple(tensordict.batch_size)}, optionally a trailing dimension of size 1), "
                f"got shape {tuple(tensordict.get(self.advantage_key).shape)}; transform one "
                "advantage column at a time"
            )
        obs = {key: flat.get(key) for key in self.actor.in_keys}
        return obs, flat.get(self.action_key), adv.reshape(-1)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Write ``A~`` for the whole batch to ``out_key`` and return ``tensordict``.

        Parameters
        ----------
        tensordict
            A batch with the actor's input keys, the actions and the advantages; every
            batch dimension is flattened into one batch of ``N`` samples.

        Returns
        -------
        TensorDictBase
            The same tensordict, with ``out_key`` holding ``A~`` (or ``eta * A~`` with
            ``max_kl``), detached, with the shape and dtype of the advantages.
        """
        obs, acts, adv = self._batch(tensordict)
        if self.max_kl is None:
            adv_t = self.rat(self.actor, obs, acts, adv.detach(), self.params)
        else:
            result = self.rat.natural_gradient(self.actor, obs, acts, adv.detach(), self.params)
            self.step_size = result.step_size(self.max_kl)
            adv_t = result.advantages * self.step_size
        shape = tensordict.get(self.advantage_key).shape
        tensordict.set(self.out_key, adv_t.reshape(shape))
        return tensordict

    def natural_gradient(self, tensordict: TensorDictBase) -> NaturalGradient:
        """The direction ``d`` and the KL step-size by-products for the batch.

        Leaves ``tensordict`` unchanged; use it for a trust-region step without a loss,
        ``eta = result.step_size(max_kl)``, ``theta += eta * d``.

        Parameters
        ----------
        tensordict
            As for :meth:`forward`.

        Returns
        -------
        NaturalGradient
            See :class:`~natgrad.NaturalGradient`; ``direction`` follows the actor's
            ``named_parameters()`` order.
        """
        obs, acts, adv = self._batch(tensordict)
        return self.rat.natural_gradient(self.actor, obs, acts, adv.detach(), self.params)

    def extra_repr(self) -> str:
        return (
            f"advantage_key={self.advantage_key!r}, out_key={self.out_key!r}, "
            f"action_key={self.action_key!r}, max_kl={self.max_kl}, rat={self.rat!r}"
        )
