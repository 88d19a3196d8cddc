"""The rollout collector: truncated episodes are bootstrapped, terminated ones are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from gymnasium import spaces  # noqa: E402

from natgrad.rl.normalize import ObsNormalizer, RewardScaler  # noqa: E402
from natgrad.rl.rollout import Collector, RolloutBuffer  # noqa: E402


class ScriptedEnv:
    """Two envs; env 0 is truncated (time limit) at step 1, env 1 terminates at step 2."""

    num_envs = 2
    single_action_space = spaces.Discrete(2)

    def __init__(self):
        self.t = 0

    def reset(self, seed=None):
        self.t = 0
        return np.zeros((2, 3)), {}

    def step(self, actions):
        self.t += 1
        obs = np.full((2, 3), float(self.t))
        reward = np.array([1.0, 2.0])
        terminated = np.array([False, self.t == 2])
        truncated = np.array([self.t == 1, False])
        info = {}
        if truncated.any() or terminated.any():
            final = np.full((2, 3), np.nan)
            final[0] = 10.0 + self.t  # the observation the time limit cut off
            final[1] = 20.0 + self.t
            info["final_obs"] = final
        return obs, reward, terminated, truncated, info


class Critic(torch.nn.Module):
    """V(s) = sum(s): distinct values for every observation above."""

    def forward(self, obs):
        return obs.sum(-1)


class Uniform(torch.nn.Module):
    def forward(self, obs):
        return torch.distributions.Categorical(logits=torch.zeros(obs.shape[0], 2))


def test_truncated_episodes_bootstrap_with_the_value_of_the_final_observation():
    gamma = 0.9
    collector = Collector(
        ScriptedEnv(),
        ObsNormalizer((3,), enabled=False),
        RewardScaler(2, gamma, enabled=False),
        gamma,
    )
    collector.reset(seed=0)
    buffer = RolloutBuffer(3, 2, (3,), (), discrete=True)
    collector.collect(Uniform(), Critic(), buffer, torch.Generator().manual_seed(0))
    expected = torch.tensor(
        [
            [1.0 + gamma * 3 * 11.0, 2.0],  # env 0 truncated: r + gamma V(final_obs)
            [1.0, 2.0],  # env 1 terminated: no bootstrap
            [1.0, 2.0],
        ]
    )
    torch.testing.assert_close(buffer.rewards, expected)
    assert buffer.dones.tolist() == [[True, False], [False, True], [False, False]]
    torch.testing.assert_close(buffer.values[:, 0], torch.tensor([0.0, 3.0, 6.0]))
