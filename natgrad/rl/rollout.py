"""On-policy rollouts from a Gymnasium vector environment into a fixed-size buffer."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from natgrad.distributions import log_prob, sample
from natgrad.rl._errors import EnvOutputError
from natgrad.rl.envs import env_actions
from natgrad.rl.gae import compute_gae
from natgrad.rl.normalize import ObsNormalizer, RewardScaler, as_array, as_tensor

__all__ = ["Batch", "Collector", "RolloutBuffer"]


@dataclass
class Batch:
    """A flattened on-policy batch, ``N = num_steps * num_envs`` samples.

    Attributes
    ----------
    obs, acts
        Normalized observations as the policy saw them, and the (unclipped) actions.
    log_probs
        ``log pi_old(a | s)`` at collection time, shape ``(N,)``.
    advantages
        GAE advantages, *not* normalized, shape ``(N,)``.
    returns
        Critic regression targets, shape ``(N,)``.
    """

    obs: Tensor
    acts: Tensor
    log_probs: Tensor
    advantages: Tensor
    returns: Tensor


class RolloutBuffer:
    """Preallocated ``(T, E, ...)`` storage for one rollout."""

    def __init__(
        self,
        num_steps: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        act_shape: tuple[int, ...],
        discrete: bool,
    ) -> None:
        shape = (num_steps, num_envs)
        self.obs = torch.zeros(shape + obs_shape)
        self.acts = torch.zeros(shape + act_shape, dtype=torch.long if discrete else torch.float32)
        self.log_probs = torch.zeros(shape)
        self.rewards = torch.zeros(shape)
        self.dones = torch.zeros(shape, dtype=torch.bool)
        self.values = torch.zeros(shape)
        self.last_value = torch.zeros(num_envs)

    @property
    def num_steps(self) -> int:
        """Steps per environment in one rollout."""
        return self.obs.shape[0]

    def batch(self, gamma: float, lam: float) -> Batch:
        """Compute GAE and flatten the rollout into a :class:`Batch`."""
        adv, ret = compute_gae(self.rewards, self.values, self.dones, self.last_value, gamma, lam)
        return Batch(
            obs=self.obs.flatten(0, 1),
            acts=self.acts.flatten(0, 1),
            log_probs=self.log_probs.flatten(),
            advantages=adv.flatten(),
            returns=ret.flatten(),
        )


def check_env_output(obs: Any, reward: Any, call: str) -> None:
    """Refuse a NaN or infinite observation or reward, before anything learns from it.

    Raises
    ------
    EnvOutputError
        Naming the call (``reset`` or ``step``), which output and how many values.
    """
    for what, value in (("observation", obs), ("reward", reward)):
        if value is None:
            continue
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise EnvOutputError(
                f"the environment's {call} returned a {what} with {bad} NaN or infinite "
                f"value(s); natgrad learns only from finite {what}s: fix the environment, or "
                f"wrap it (gymnasium.wrappers.Transform{what.capitalize()}) to replace or "
                "end the episode on such values"
            )


class Collector:
    """Steps a vector environment with a policy, tracking episodes and normalization.

    Parameters
    ----------
    vec_env
        A Gymnasium vector env with same-step autoreset (see :func:`~natgrad.rl.envs.make_vec_env`).
    obs_norm, reward_scaler
        Running observation normalizer and reward scaler (their state is part of the run).
    gamma
        Discount used to bootstrap truncated episodes.
    window
        Number of recent finished episodes kept for ``recent_return``.
    """

    def __init__(
        self,
        vec_env: Any,
        obs_norm: ObsNormalizer,
        reward_scaler: RewardScaler,
        gamma: float,
        window: int = 20,
    ) -> None:
        self.env = vec_env
        self.obs_norm = obs_norm
        self.reward_scaler = reward_scaler
        self.gamma = gamma
        self.action_space = vec_env.single_action_space
        num_envs = vec_env.num_envs
        self.obs: np.ndarray | None = None
        self.episode_return = np.zeros(num_envs)
        self.episode_length = np.zeros(num_envs, dtype=np.int64)
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)
        self.total_episodes = 0

    def reset(self, seed: int) -> None:
        """Reset every environment; env ``i`` is seeded with ``seed + i``."""
        raw, _ = self.env.reset(seed=seed)
        check_env_output(raw, None, "reset")
        self.obs = self.obs_norm(raw, update=True)
        self.episode_return[:] = 0.0
        self.episode_length[:] = 0

    @torch.no_grad()
    def collect(
        self,
        policy: nn.Module,
        critic: nn.Module,
        buffer: RolloutBuffer,
        generator: torch.Generator,
    ) -> list[tuple[float, int]]:
        """Fill ``buffer`` with one rollout; return ``(return, length)`` of finished episodes."""
        if self.obs is None:
            raise RuntimeError("Collector.reset(seed) must be called before collect()")
        finished: list[tuple[float, int]] = []
        for t in range(buffer.num_steps):
            obs = torch.as_tensor(self.obs)
            dist = policy(obs)
            acts = sample(dist, generator)
            buffer.obs[t] = obs
            buffer.acts[t] = acts
            buffer.log_probs[t] = log_prob(dist, acts)
            buffer.values[t] = critic(obs)
            env_acts = env_actions(self.action_space, acts.numpy())
            raw, reward, terminated, truncated, info = self.env.step(env_acts)
            check_env_output(raw, reward, "step")
            done = np.logical_or(terminated, truncated)
            self.episode_return += reward
            self.episode_length += 1
            scaled = torch.as_tensor(self.reward_scaler(reward, done))
            if np.any(truncated & ~terminated):
                # A time limit is not a terminal state: bootstrap with V(final observation).
                for i in np.flatnonzero(truncated & ~terminated):
                    check_env_output(info["final_obs"][i], None, "step (final observation)")
                    final = self.obs_norm(info["final_obs"][i][None], update=False)
                    scaled[i] += self.gamma * critic(torch.as_tensor(final))[0]
            buffer.rewards[t] = scaled
            buffer.dones[t] = torch.as_tensor(done)
            for i in np.flatnonzero(done):
                finished.append((float(self.episode_return[i]), int(self.episode_length[i])))
                self.episode_return[i] = 0.0
                self.episode_length[i] = 0
            self.obs = self.obs_norm(raw, update=True)
        buffer.last_value = critic(torch.as_tensor(self.obs))
        self.recent.extend(finished)
        self.total_episodes += len(finished)
        return finished

    def recent_return(self) -> float:
        """Mean undiscounted return of the last ``window`` finished episodes (NaN if none)."""
        return float(np.mean([r for r, _ in self.recent])) if self.recent else float("nan")

    def recent_length(self) -> float:
        """Mean length of the last ``window`` finished episodes (NaN if none)."""
        return float(np.mean([n for _, n in self.recent])) if self.recent else float("nan")

    def state_dict(self) -> dict[str, Any]:
        """Everything but the environments themselves, as tensors and plain data.

        The environments are saved apart (see :func:`~natgrad.rl.envs.env_state`).
        """
        return {
            "obs": None if self.obs is None else as_tensor(self.obs),
            "episode_return": as_tensor(self.episode_return),
            "episode_length": as_tensor(self.episode_length),
            "recent": list(self.recent),
            "total_episodes": self.total_episodes,
            "obs_norm": self.obs_norm.state_dict(),
            "reward_scaler": self.reward_scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`."""
        self.obs = None if state["obs"] is None else as_array(state["obs"], np.float32)
        self.episode_return = as_array(state["episode_return"], np.float64)
        self.episode_length = as_array(state["episode_length"], np.int64)
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.total_episodes = int(state["total_episodes"])
        self.obs_norm.load_state_dict(state["obs_norm"])
        self.reward_scaler.load_state_dict(state["reward_scaler"])
