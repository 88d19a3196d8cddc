"""What ``RATTRPO`` and ``RATNPG`` share: an SB3 on-policy algorithm with a RAT policy step.

The structure follows ``sb3_contrib.TRPO`` (Schulman et al., 2015; the sb3-contrib
implementation): one policy step per rollout over the whole buffer, then the critic is
fitted by regression for ``n_critic_updates`` epochs. Only the policy step differs: the
direction comes from :meth:`natgrad.RATNaturalGradient.natural_gradient` over the
policy's actor parameters, and its KL step size in closed form.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution, kl_divergence
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import Tensor, nn
from torch.nn import functional as F

from natgrad import NaturalGradient, RATNaturalGradient
from natgrad._checks import is_integer, is_real
from natgrad._tree import Tree, tree_map
from natgrad.sb3._errors import InvalidArgumentError, UnsupportedArgumentError, refuse_keywords
from natgrad.solvers import RL_AGENT

__all__ = ["PolicyBatch", "RATOnPolicyAlgorithm", "sb3_log_prob"]

SelfRAT = TypeVar("SelfRAT", bound="RATOnPolicyAlgorithm")

# RATNaturalGradient keywords accepted through ``rat_kwargs`` (the others are explicit).
RAT_KWARGS = ("backend", "memory_budget", "on_nonconvergence", "resample_blocks", "compile")


def sb3_log_prob(policy: nn.Module, obs: Tree, acts: Tensor) -> Tensor:
    """``log pi(a | s)`` of an SB3 ``ActorCriticPolicy`` (its own observation preprocessing).

    ``get_distribution`` runs the policy's features extractor (normalizing images,
    one-hot encoding discrete observations, per-key extractors for dict observations)
    and the actor head; SB3's distributions already sum over action dimensions.
    """
    return policy.get_distribution(obs).log_prob(acts)  # type: ignore[operator]


def joint_kl(old: Distribution, new: Distribution) -> Tensor:
    """Mean over samples of ``KL(old || new)`` of the joint action distribution.

    Per-dimension KLs (a diagonal Gaussian) are summed, unlike ``sb3_contrib.TRPO``, which
    averages them: the KL the trust region bounds is the one ``d^T F d`` models.
    """
    kl = kl_divergence(old, new)
    return kl.reshape(kl.shape[0], -1).sum(1).mean()


@dataclass(frozen=True)
class PolicyBatch:
    """The rollout buffer as one batch for the policy step."""

    obs: Tree
    acts: Tensor
    old_log_prob: Tensor
    adv: Tensor


class RATOnPolicyAlgorithm(OnPolicyAlgorithm):
    """Base of :class:`~natgrad.sb3.RATTRPO` and :class:`~natgrad.sb3.RATNPG`.

    Subclasses implement :meth:`_policy_step`, which applies the step along the natural
    gradient and returns the values to log.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {  # type: ignore[misc]
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }
    rat: RATNaturalGradient

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        *,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        damping: float = RL_AGENT.damping,
        solver: str = RL_AGENT.solver,
        tol: float = RL_AGENT.tol,
        block_size: int = RL_AGENT.block_size,
        max_epochs: int = RL_AGENT.max_epochs,
        max_iters: int = RL_AGENT.max_iters,
        preconditioner_rank: int = RL_AGENT.preconditioner_rank,
        rat_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        refuse_keywords(type(self).__name__, kwargs)
        super().__init__(
            policy,
            env,  # type: ignore[arg-type]
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=0.0,  # the policy step maximizes the surrogate alone
            vf_coef=0.0,  # the critic is fitted separately
            max_grad_norm=0.0,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=(
                spaces.Box,
                spaces.Discrete,
                spaces.MultiDiscrete,
                spaces.MultiBinary,
            ),
        )
        self.batch_size = batch_size
        self.n_critic_updates = n_critic_updates
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.sub_sampling_factor = sub_sampling_factor
        self.damping = damping
        self.solver = solver
        self.tol = tol
        self.block_size = block_size
        self.max_epochs = max_epochs
        self.max_iters = max_iters
        self.preconditioner_rank = preconditioner_rank
        self.rat_kwargs = rat_kwargs  # checked (None -> {}) and copied by _check_arguments
        self._check_arguments()
        self.rat = self._build_rat()  # validates the solver keywords now
        self._actor_names: tuple[str, ...] | None = None
        if _init_setup_model:
            self._setup_model()

    # -- construction -------------------------------------------------------------------
    def _check_arguments(self, warn: bool = True) -> None:
        """Refuse keywords the algorithm cannot train with (at construction and on ``load``)."""
        name = type(self).__name__
        target_kl = self.target_kl
        if not (is_real(target_kl) and math.isfinite(target_kl) and target_kl > 0):
            raise InvalidArgumentError(
                f"{name} got target_kl={self.target_kl!r}; the KL trust region needs a finite "
                "target_kl > 0, e.g. 0.01"
            )
        integers = (
            ("n_steps", 1),  # 0 or less reached SB3's rollout as a bare UnboundLocalError
            ("sub_sampling_factor", 1),
            ("n_critic_updates", 0),
            ("batch_size", 1),
        )
        for key, least in integers:
            value = getattr(self, key)
            if not is_integer(value) or value < least:
                raise InvalidArgumentError(
                    f"{name} got {key}={value!r}; pass an integer >= {least}"
                )
        for key in ("gamma", "gae_lambda"):  # else a bare numpy error after the first rollout
            value = getattr(self, key)
            if not (is_real(value) and 0.0 <= value <= 1.0):
                raise InvalidArgumentError(
                    f"{name} got {key}={value!r}; pass a float in [0, 1], e.g. 0.99 for gamma, "
                    "0.95 for gae_lambda"
                )
        rate = self.learning_rate
        if not callable(rate) and not (is_real(rate) and math.isfinite(rate) and rate >= 0):
            # 0 is allowed: rl-zoo's ``enjoy`` loads with learning_rate=0.0 (a frozen critic)
            raise InvalidArgumentError(
                f"{name} got learning_rate={rate!r} (the critic's Adam step size); pass a "
                "finite float >= 0, e.g. 1e-3, or a schedule"
            )
        rat_kwargs = {} if self.rat_kwargs is None else self.rat_kwargs  # load(rat_kwargs=None)
        if not isinstance(rat_kwargs, dict):
            raise InvalidArgumentError(
                f"{name} got rat_kwargs={rat_kwargs!r}; pass a dict of RATNaturalGradient "
                "keywords (e.g. {'backend': 'streaming'}) or None"
            )
        self.rat_kwargs = dict(rat_kwargs)
        unknown = sorted(set(self.rat_kwargs) - set(RAT_KWARGS))
        if unknown:
            raise UnsupportedArgumentError(
                f"{name} got rat_kwargs key {unknown[0]!r}; rat_kwargs takes only "
                f"{', '.join(RAT_KWARGS)} (the other RATNaturalGradient keywords are "
                f"{name}'s own: damping, solver, tol, block_size, max_epochs, max_iters, "
                "preconditioner_rank; the seed is the algorithm's seed)"
            )
        if self.env is None:
            return
        buffer_size = self.env.num_envs * self.n_steps
        policy_samples = -(-buffer_size // self.sub_sampling_factor)  # every k-th sample
        if self.normalize_advantage and policy_samples < 2:
            raise InvalidArgumentError(
                f"{name} got n_steps * n_envs = {buffer_size} and sub_sampling_factor="
                f"{self.sub_sampling_factor}, so the policy step sees {policy_samples} "
                "sample(s); normalize_advantage=True needs at least 2: raise n_steps or "
                "the number of envs, or lower sub_sampling_factor"
            )
        if warn and buffer_size % self.batch_size:
            warnings.warn(
                f"batch_size={self.batch_size} does not divide n_steps * n_envs = "
                f"{buffer_size}: the critic's last minibatch of each epoch is smaller",
                # point at the user's call, past a subclass's own __init__
                stacklevel=3 + (type(self).__init__ is not RATOnPolicyAlgorithm.__init__),
            )

    def _build_rat(self) -> RATNaturalGradient:
        return RATNaturalGradient(
            sb3_log_prob,
            damping=self.damping,
            solver=self.solver,  # type: ignore[arg-type]
            block_size=self.block_size,
            max_epochs=self.max_epochs,
            tol=self.tol,
            max_iters=self.max_iters,
            seed=self.seed,
            preconditioner_rank=self.preconditioner_rank,
            **self.rat_kwargs,
        )

    def _setup_model(self) -> None:
        # ``load`` sets the saved keywords and its overrides as attributes, then calls this:
        # check them again, so an override cannot bypass the constructor's checks.
        self._check_arguments(warn=False)
        super()._setup_model()
        # Rebuilt here, not unpickled: ``load`` restores the keywords, then calls this.
        self.rat = self._build_rat()
        self._actor_names = None

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "rat", "_actor_names"]

    @classmethod
    def load(cls, path: Any, env: GymEnv | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """SB3's ``load``; keyword overrides must be keywords of the constructor.

        SB3 sets any keyword as an attribute, so a TRPO keyword (``cg_damping=``) or a typo
        would be stored and ignored; they are refused as in the constructor instead.
        """
        loading = {"device", "custom_objects", "print_system_info", "force_reset"}
        accepted = set(inspect.signature(cls.__init__).parameters) - {
            "self",
            "policy",
            "env",
            "kwargs",
            "_init_setup_model",
        }
        refuse_keywords(
            f"{cls.__name__}.load",
            {k: v for k, v in kwargs.items() if k not in accepted | loading},
        )
        return super().load(path, env=env, **kwargs)

    # -- one update ---------------------------------------------------------------------
    def _policy_batch(self) -> PolicyBatch:
        data = next(iter(self.rollout_buffer.get(batch_size=None)))
        every = self.sub_sampling_factor

        def sub(tensor: Tensor) -> Tensor:
            return tensor[::every]

        acts = sub(data.actions)
        if isinstance(self.action_space, spaces.Discrete):
            acts = acts.long().flatten()
        adv = sub(data.advantages)
        if self.normalize_advantage:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        # SB3's preprocessing casts observations to float32 anyway (``preprocess_obs``);
        # RAT wants floating inputs in the parameters' dtype (a Dict buffer keeps float64).
        dtype = next(self.policy.parameters()).dtype

        def observation(tensor: Tensor) -> Tensor:
            tensor = sub(tensor)
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        obs = tree_map(observation, data.observations)
        return PolicyBatch(obs, acts, sub(data.old_log_prob), adv)

    def actor_parameter_names(self, batch: PolicyBatch) -> tuple[str, ...]:
        """Names of the policy parameters that the log-probability depends on.

        Found once by autograd on one sample (custom policies included): the critic's
        own layers drop out, a features extractor shared with the critic stays in (as in
        ``sb3_contrib.TRPO``, the critic's regression then leaves it alone).
        """
        if self._actor_names is None:
            named = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
            one = tree_map(lambda t: t[:1], batch.obs)
            with th.enable_grad():
                log_prob = sb3_log_prob(self.policy, one, batch.acts[:1]).sum()
                grads = th.autograd.grad(log_prob, [p for _, p in named], allow_unused=True)
            self._actor_names = tuple(
                n for (n, _), g in zip(named, grads, strict=True) if g is not None
            )
        return self._actor_names

    def natural_gradient(self, batch: PolicyBatch) -> NaturalGradient:
        """The RAT natural gradient of the batch's surrogate over the actor parameters."""
        names = set(self.actor_parameter_names(batch))
        params = [p for n, p in self.policy.named_parameters() if n in names]
        with th.enable_grad():  # per-sample scores need autograd
            return self.rat.natural_gradient(
                self.policy, batch.obs, batch.acts, batch.adv, params=params
            )

    def _surrogate(self, batch: PolicyBatch) -> tuple[Distribution, Tensor]:
        """The policy's distribution on the batch and the surrogate ``mean(ratio * A)``."""
        dist = self.policy.get_distribution(batch.obs)  # type: ignore[operator]
        ratio = th.exp(dist.log_prob(batch.acts) - batch.old_log_prob)
        return dist, (ratio * batch.adv).mean()

    def _policy_step(
        self, batch: PolicyBatch, ng: NaturalGradient, old: Distribution, objective: float
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _fit_critic(self, actor: set[str]) -> list[float]:
        """``n_critic_updates`` epochs of value regression; actor parameters stay fixed."""
        actor_params = [p for n, p in self.policy.named_parameters() if n in actor]
        losses = []
        for _ in range(self.n_critic_updates):
            for data in self.rollout_buffer.get(self.batch_size):
                values = self.policy.predict_values(data.observations)
                loss = F.mse_loss(data.returns, values.flatten())
                self.policy.optimizer.zero_grad()
                loss.backward()
                for param in actor_params:  # a shared trunk moves only by the policy step
                    param.grad = None
                self.policy.optimizer.step()
                losses.append(loss.item())
        return losses

    def train(self) -> None:
        """One policy step along the RAT natural gradient, then the critic regression."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        batch = self._policy_batch()
        with th.no_grad():
            dist, objective = self._surrogate(batch)
            old = copy.copy(dist)  # get_distribution reuses one object; keep this one
        ng = self.natural_gradient(batch)
        stats = self._policy_step(batch, ng, old, float(objective))
        value_losses = self._fit_critic(set(ng.param_names))
        self._n_updates += 1
        self._record(ng, stats, value_losses)

    # -- logging ------------------------------------------------------------------------
    def _record(self, ng: NaturalGradient, stats: dict[str, Any], losses: list[float]) -> None:
        diag = ng.diagnostics
        explained = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        record = self.logger.record
        for key, value in stats.items():
            record(f"train/{key}", value)
        if losses:
            record("train/value_loss", float(np.mean(losses)))
        record("train/explained_variance", float(explained))
        record("train/g_dot_d", ng.g_dot_d)
        record("train/d_fisher_d", ng.d_fisher_d)
        record("train/rat_solver", diag.solver)
        record("train/rat_backend", diag.backend)
        record("train/rat_residual", diag.residual)
        record("train/rat_iterations", diag.iterations)
        record("train/rat_converged", float(diag.converged))
        record("train/rat_seconds", diag.seconds)
        record("train/rat_fallbacks", len(diag.fallbacks))
        if diag.direction_error is not None:
            record("train/rat_direction_error", diag.direction_error)
        if hasattr(self.policy, "log_std"):
            record("train/std", th.exp(self.policy.log_std).mean().item())
        record("train/n_updates", self._n_updates, exclude="tensorboard")

    def learn(
        self: SelfRAT,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfRAT:
        """Train for ``total_timesteps`` steps (as ``OnPolicyAlgorithm.learn``).

        ``tb_log_name`` defaults to the class name (``"RATTRPO"``, ``"RATNPG"``).
        """
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name or type(self).__name__,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
