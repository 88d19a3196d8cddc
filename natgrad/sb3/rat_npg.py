"""``RATNPG``: the natural policy gradient from RAT with the closed-form KL step."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.distributions import Distribution

from natgrad import NaturalGradient
from natgrad.sb3._base import PolicyBatch, RATOnPolicyAlgorithm, joint_kl
from natgrad.sb3._step import ParameterStep

__all__ = ["RATNPG"]


class RATNPG(RATOnPolicyAlgorithm):
    """Natural policy gradient with RAT and the KL-scaled step, no line search.

    Each update sets ``theta += eta * d`` with ``d = (F + lam I)^{-1} g`` from
    :class:`natgrad.RATNaturalGradient` over the actor parameters and
    ``eta = sqrt(2 target_kl / d^T F d)`` (the step whose quadratic KL model equals
    ``target_kl``), then fits the critic as :class:`~natgrad.sb3.RATTRPO` does. One
    forward pass after the step measures the KL actually taken (logged as
    ``train/kl_divergence_loss``); it does not change the step.

    Parameters
    ----------
    policy, env, learning_rate, n_steps, batch_size, gamma, n_critic_updates, gae_lambda, \
use_sde, sde_sample_freq, rollout_buffer_class, rollout_buffer_kwargs, \
normalize_advantage, target_kl, sub_sampling_factor, damping, solver, tol, block_size, \
max_epochs, max_iters, preconditioner_rank, rat_kwargs, stats_window_size, \
tensorboard_log, policy_kwargs, verbose, seed, device, _init_setup_model, **kwargs
        As in :class:`~natgrad.sb3.RATTRPO`, which has the line search's two keywords
        (``line_search_shrinking_factor``, ``line_search_max_iter``) besides.

    Notes
    -----
    Logs what :class:`~natgrad.sb3.RATTRPO` logs, without the line-search entries.
    """

    def _policy_step(
        self, batch: PolicyBatch, ng: NaturalGradient, old: Distribution, objective: float
    ) -> dict[str, Any]:
        eta = ng.step_size(self.target_kl)
        ParameterStep(self.policy, ng).apply(eta)
        with th.no_grad():
            dist, new_objective = self._surrogate(batch)
            kl = float(joint_kl(old, dist))
        return {
            "kl_divergence_loss": kl,
            "policy_objective": float(new_objective),
            "step_size": eta,
        }
