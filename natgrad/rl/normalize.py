"""Running observation normalization and reward scaling (state is saved with checkpoints).

``state_dict`` returns tensors and plain numbers only, so checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["ObsNormalizer", "RewardScaler", "RunningMeanStd", "as_array", "as_tensor"]


def as_tensor(array: np.ndarray | float) -> torch.Tensor:
    """A tensor copy of a NumPy array or scalar (what checkpoints store)."""
    return torch.from_numpy(np.array(array))


def as_array(value: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    """A NumPy copy of what :func:`as_tensor` stored (arrays are accepted too)."""
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    return np.array(value, dtype=dtype)


class RunningMeanStd:
    """Streaming mean and variance (Chan et al. parallel update), in float64.

    Parameters
    ----------
    shape
        Shape of one sample.
    epsilon
        Initial pseudo-count, so the first batch does not divide by zero.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = float(epsilon)

    def update(self, batch: np.ndarray) -> None:
        """Fold a batch (samples along axis 0) into the statistics."""
        batch = np.asarray(batch, dtype=np.float64)
        batch_mean, batch_var, n = batch.mean(axis=0), batch.var(axis=0), batch.shape[0]
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        """Return a copy of the statistics (float64 tensors and a float)."""
        return {
            "mean": as_tensor(self.mean),
            "var": as_tensor(self.var),
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict`."""
        self.mean = as_array(state["mean"], np.float64)
        self.var = as_array(state["var"], np.float64)
        self.count = float(state["count"])


class ObsNormalizer:
    """Whitens observations with running statistics and clips to ``[-clip, clip]``.

    Parameters
    ----------
    shape
        Observation shape.
    enabled
        ``False`` makes this the identity (used for image observations).
    clip
        Clip bound after whitening.
    """

    def __init__(self, shape: tuple[int, ...], enabled: bool = True, clip: float = 10.0) -> None:
        self.enabled = enabled
        self.clip = clip
        self.rms = RunningMeanStd(shape)

    def __call__(self, obs: np.ndarray, update: bool) -> np.ndarray:
        """Normalize a batch ``obs``; ``update=True`` first folds it into the statistics."""
        if not self.enabled:
            return np.asarray(obs, dtype=np.float32)
        if update:
            self.rms.update(obs)
        out = (obs - self.rms.mean) / np.sqrt(self.rms.var + 1e-8)
        return np.clip(out, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        """Return the running statistics."""
        return {"enabled": self.enabled, "clip": self.clip, "rms": self.rms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict`."""
        self.enabled = bool(state["enabled"])
        self.clip = float(state["clip"])
        self.rms.load_state_dict(state["rms"])


class RewardScaler:
    """Divides rewards by the running standard deviation of the discounted return.

    This is the reward scaling of PPO implementations (no mean subtraction, so the sign of
    rewards and thus the meaning of termination are preserved).

    Parameters
    ----------
    num_envs
        Number of parallel environments (one running return each).
    gamma
        Discount of the running return.
    enabled
        ``False`` makes this the identity.
    clip
        Clip bound of the scaled reward.
    """

    def __init__(
        self, num_envs: int, gamma: float, enabled: bool = True, clip: float = 10.0
    ) -> None:
        self.enabled = enabled
        self.gamma = gamma
        self.clip = clip
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.rms = RunningMeanStd(())

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """Scale one vector step of rewards; ``dones`` ends the running return per env."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if not self.enabled:
            return rewards.astype(np.float32)
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(self.returns)
        self.returns[np.asarray(dones, dtype=bool)] = 0.0
        scaled = rewards / np.sqrt(self.rms.var + 1e-8)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        """Return the running return and its statistics."""
        return {
            "enabled": self.enabled,
            "gamma": self.gamma,
            "clip": self.clip,
            "returns": as_tensor(self.returns),
            "rms": self.rms.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`."""
        self.enabled = bool(state["enabled"])
        self.gamma = float(state["gamma"])
        self.clip = float(state["clip"])
        self.returns = as_array(state["returns"], np.float64)
        self.rms.load_state_dict(state["rms"])
