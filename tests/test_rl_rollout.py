"""The rollout collector: truncated episodes are bootstrapped, terminated ones are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

import gymnasium  # noqa: E402
from gymnasium import spaces  # noqa: E402

from natgrad.rl import TrainConfig, Trainer, evaluate  # noqa: E402
from natgrad.rl.envs import env_actions  # noqa: E402
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


class ShiftedActions(gymnasium.Env):
    """Actions {-1, 0, 1} (``Discrete(3, start=-1)``); the reward is the action taken."""

    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    action_space = spaces.Discrete(3, start=-1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), f"{action!r} is not in {self.action_space}"
        return np.zeros(2, np.float32), float(action), False, False, {}


SHIFTED = "natgrad-test/ShiftedActions-v0"


def test_env_actions_shift_discrete_indices_by_start_and_clip_boxes():
    indices = np.array([0, 1, 2])
    assert env_actions(spaces.Discrete(3, start=-1), indices).tolist() == [-1, 0, 1]
    assert env_actions(spaces.Discrete(3), indices) is indices
    box = spaces.Box(-1, 1, (2,), np.float32)
    assert env_actions(box, np.array([[-3.0, 0.5]])).tolist() == [[-1.0, 0.5]]


def test_a_discrete_space_with_a_start_gets_its_own_actions(tmp_path):
    if SHIFTED not in gymnasium.registry:
        gymnasium.register(SHIFTED, entry_point=ShiftedActions, max_episode_steps=8)
    config = TrainConfig(env=SHIFTED, steps=128, num_envs=2, num_steps=32, hidden=(8,))
    trainer = Trainer(config, tmp_path, tensorboard=False)
    trainer.run(progress=False)
    trainer.close()
    assert set(trainer.buffer.acts.unique().tolist()) <= {0, 1, 2}  # the policy's indices
    for deterministic in (True, False):
        result = evaluate(tmp_path, episodes=2, deterministic=deterministic)
        assert all(-8 <= r <= 8 for r in result.returns) and result.lengths == (8, 8)
