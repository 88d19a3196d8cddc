"""``RATTRPO``: ``sb3_contrib.TRPO`` with the RAT natural gradient in place of CG."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from natgrad import NaturalGradient
from natgrad._checks import is_integer, is_real
from natgrad.sb3._base import PolicyBatch, RATOnPolicyAlgorithm, joint_kl
from natgrad.sb3._errors import InvalidArgumentError
from natgrad.sb3._step import ParameterStep
from natgrad.solvers import RL_AGENT

__all__ = ["RATTRPO"]


class RATTRPO(RATOnPolicyAlgorithm):
    """Trust Region Policy Optimization with the natural gradient from RAT.

    Used like ``sb3_contrib.TRPO``: ``RATTRPO("MlpPolicy", env, ...)`` with ``"MlpPolicy"``,
    ``"CnnPolicy"`` or ``"MultiInputPolicy"`` (SB3's actor-critic policies), then
    ``learn``, ``save``, ``load``, ``predict``. Each update takes the whole rollout buffer
    (every ``sub_sampling_factor``-th sample) and

    1. computes ``d = (F + lam I)^{-1} g`` over the actor parameters with
       :class:`natgrad.RATNaturalGradient` (``F = J^T J / N`` from the per-sample scores of
       the sampled actions, ``g`` the gradient of the surrogate ``mean(ratio * A)``),
       instead of TRPO's conjugate gradient on Hessian-vector products;
    2. scales it to the KL step ``eta = sqrt(2 target_kl / d^T F d)``;
    3. backtracks ``eta * shrink**j`` (``j < line_search_max_iter``) until
       ``KL(pi_old || pi_new) <= target_kl`` and the surrogate improves, else keeps the
       old parameters (as TRPO);
    4. fits the critic for ``n_critic_updates`` epochs of minibatches of ``batch_size``.

    The KL is that of the joint action distribution (summed over the dimensions of a
    diagonal Gaussian; ``sb3_contrib.TRPO`` averages them).

    Parameters
    ----------
    policy, env, learning_rate, n_steps, batch_size, gamma, n_critic_updates, gae_lambda, \
use_sde, sde_sample_freq, rollout_buffer_class, rollout_buffer_kwargs, \
normalize_advantage, target_kl, sub_sampling_factor, stats_window_size, \
tensorboard_log, policy_kwargs, verbose, seed, device
        As in ``sb3_contrib.TRPO`` (``learning_rate`` and ``batch_size`` are the critic's).
        Everything after ``gamma`` is keyword-only.
    line_search_shrinking_factor
        Factor between line-search candidates, in ``(0, 1)``.
    line_search_max_iter
        Candidates tried before the update is rejected.
    damping
        Tikhonov damping ``lam > 0`` of ``(F + lam I) d = g``, in units of the per-sample
        Fisher; replaces TRPO's ``cg_damping``.
    solver, tol, block_size, max_epochs, max_iters, preconditioner_rank
        Keywords of :class:`natgrad.RATNaturalGradient` (defaults: the preset
        :data:`natgrad.solvers.RL_AGENT`). TRPO's ``cg_max_steps`` has no counterpart: the
        solve runs to ``tol``.
    rat_kwargs
        Other :class:`~natgrad.RATNaturalGradient` keywords: ``backend``,
        ``memory_budget``, ``on_nonconvergence``, ``resample_blocks``, ``compile``.
    _init_setup_model
        Build the networks now (SB3's ``load`` passes ``False``).
    **kwargs
        Refused: TRPO's ``cg_max_steps`` and ``cg_damping`` and unknown keywords raise
        :class:`~natgrad.sb3.UnsupportedArgumentError`.

    Raises
    ------
    natgrad.sb3.UnsupportedArgumentError
        For ``cg_max_steps``, ``cg_damping`` (TRPO's; the message names the replacement)
        and unknown keywords.
    natgrad.sb3.InvalidArgumentError
        For values it cannot train with (``target_kl <= 0``, ...).

    Notes
    -----
    Logged under ``train/``: ``kl_divergence_loss`` (KL of the step taken, 0 when
    rejected), ``policy_objective``, ``is_line_search_success``,
    ``line_search_backtracks``, ``step_size`` (``eta`` times the accepted fraction),
    ``value_loss``, ``explained_variance``, ``std``, ``g_dot_d``, ``d_fisher_d`` and the
    RAT diagnostics ``rat_solver``, ``rat_backend``, ``rat_residual``,
    ``rat_iterations``, ``rat_converged``, ``rat_seconds``, ``rat_fallbacks``,
    ``rat_direction_error``. The :class:`~natgrad.RATNaturalGradient` (attribute
    ``rat``) is not saved: ``load`` rebuilds it from the saved keywords.
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        *,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
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
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        super().__init__(
            policy,
            env,
            learning_rate,
            n_steps,
            batch_size,
            gamma,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            damping=damping,
            solver=solver,
            tol=tol,
            block_size=block_size,
            max_epochs=max_epochs,
            max_iters=max_iters,
            preconditioner_rank=preconditioner_rank,
            rat_kwargs=rat_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
            **kwargs,
        )

    def _check_arguments(self, warn: bool = True) -> None:
        super()._check_arguments(warn)
        factor, max_iter = self.line_search_shrinking_factor, self.line_search_max_iter
        if not (is_real(factor) and 0.0 < factor < 1.0):
            raise InvalidArgumentError(
                f"RATTRPO got line_search_shrinking_factor={factor!r}; it must be a float "
                "in (0, 1), e.g. 0.8"
            )
        if not is_integer(max_iter) or max_iter < 1:
            raise InvalidArgumentError(
                f"RATTRPO got line_search_max_iter={max_iter!r}; pass an integer >= 1"
            )

    def _policy_step(
        self, batch: PolicyBatch, ng: NaturalGradient, old: Distribution, objective: float
    ) -> dict[str, Any]:
        eta = ng.step_size(self.target_kl)
        step = ParameterStep(self.policy, ng)
        fraction = 1.0
        with th.no_grad():
            for backtracks in range(self.line_search_max_iter):
                step.apply(fraction * eta)
                dist, new_objective = self._surrogate(batch)
                kl = float(joint_kl(old, dist))
                if kl <= self.target_kl and float(new_objective) > objective:
                    return {
                        "kl_divergence_loss": kl,
                        "policy_objective": float(new_objective),
                        "is_line_search_success": 1.0,
                        "line_search_backtracks": backtracks,
                        "step_size": fraction * eta,
                    }
                fraction *= self.line_search_shrinking_factor
        step.undo()
        return {
            "kl_divergence_loss": 0.0,
            "policy_objective": objective,
            "is_line_search_success": 0.0,
            "line_search_backtracks": self.line_search_max_iter,
            "step_size": 0.0,
        }
