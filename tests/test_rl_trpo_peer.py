"""``cg-trpo``'s update and natgrad's rollouts against sb3-contrib's TRPO, independently written.

From the same weights and the same batch, one ``CGTRPO.update`` with sb3-contrib's setting
in natgrad's units (trust region and damping times the action dimension: sb3-contrib
averages the KL over action dimensions, natgrad sums them) must move the policy to the
same parameters as one ``TRPO.train()``. This pins the update itself (CG on Fisher-vector
products, step scaling, line search). With the same weights, env seeds and deterministic
actions, natgrad's :class:`~natgrad.rl.rollout.Collector` must record what sb3-contrib's
rollout with ``VecNormalize`` records (normalized observations, values, scaled rewards with
truncated episodes bootstrapped, GAE advantages and returns).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sb3_contrib")
gym = pytest.importorskip("gymnasium")

from sb3_contrib import TRPO  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env  # noqa: E402
from stable_baselines3.common.logger import configure  # noqa: E402
from stable_baselines3.common.vec_env import VecNormalize  # noqa: E402

from natgrad.distributions import log_prob  # noqa: E402
from natgrad.rl.algorithms.trpo import CGTRPO, CGTRPOOptions  # noqa: E402
from natgrad.rl.envs import make_vec_env  # noqa: E402
from natgrad.rl.normalize import ObsNormalizer, RewardScaler  # noqa: E402
from natgrad.rl.policies import GaussianPolicy, ValueFunction  # noqa: E402
from natgrad.rl.rollout import Collector, RolloutBuffer  # noqa: E402

OBS_DIM, ACT_DIM, N = 5, 3, 256


class RandomBox(gym.Env):
    """Continuous control with random observations: only the spaces matter here."""

    observation_space = gym.spaces.Box(-5.0, 5.0, (OBS_DIM,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def peer_model(target_kl: float, cg_damping: float, seed: int) -> TRPO:
    model = TRPO(
        "MlpPolicy", RandomBox(), n_steps=N, batch_size=N, target_kl=target_kl,
        cg_damping=cg_damping, cg_max_steps=25, n_critic_updates=1, seed=seed, device="cpu",
    )  # fmt: skip
    model.set_logger(configure(None, [""]))
    return model


def natgrad_copy(model: TRPO) -> tuple[GaussianPolicy, ValueFunction]:
    """natgrad's policy and critic holding the peer's weights (same layout: 64-64 tanh)."""
    space = model.observation_space.shape[0], model.action_space.shape[0]
    policy = GaussianPolicy(space[:1], space[1], (64, 64))
    critic = ValueFunction(space[:1], (64, 64))
    peer = model.policy
    pairs = [
        (policy.torso.net[0], peer.mlp_extractor.policy_net[0]),
        (policy.torso.net[2], peer.mlp_extractor.policy_net[2]),
        (policy.head, peer.action_net),
        (critic.torso.net[0], peer.mlp_extractor.value_net[0]),
        (critic.torso.net[2], peer.mlp_extractor.value_net[2]),
        (critic.head, peer.value_net),
    ]
    with torch.no_grad():
        for ours, theirs in pairs:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        policy.log_std.copy_(peer.log_std)
    return policy, critic


def fill_buffer(model: TRPO, obs: torch.Tensor, acts: torch.Tensor, adv: np.ndarray) -> None:
    """Put one batch in the peer's rollout buffer, with the given advantages."""
    buffer = model.rollout_buffer
    buffer.reset()
    with torch.no_grad():
        dist = model.policy.get_distribution(obs)
        old = dist.log_prob(acts)
        values = model.policy.predict_values(obs)
    for t in range(N):
        buffer.add(obs[t : t + 1].numpy(), acts[t : t + 1].numpy(), np.zeros(1),
                   np.zeros(1), values[t : t + 1].flatten(), old[t : t + 1])  # fmt: skip
    buffer.compute_returns_and_advantage(values[-1:].flatten(), np.zeros(1))
    buffer.advantages[:] = adv.reshape(N, 1)


def actor_vector(model: TRPO) -> torch.Tensor:
    peer = model.policy
    parts = [peer.mlp_extractor.policy_net[0], peer.mlp_extractor.policy_net[2], peer.action_net]
    flat = [t.detach().reshape(-1) for m in parts for t in (m.weight, m.bias)]
    return torch.cat([*flat, peer.log_std.detach()])


def natgrad_vector(policy: GaussianPolicy) -> torch.Tensor:
    parts = [policy.torso.net[0], policy.torso.net[2], policy.head]
    flat = [t.detach().reshape(-1) for m in parts for t in (m.weight, m.bias)]
    return torch.cat([*flat, policy.log_std.detach()])


@pytest.mark.parametrize(("seed", "target_kl", "cg_damping"), [(0, 0.01, 0.1), (3, 0.04, 0.1),
                                                              (7, 0.02, 0.01)])  # fmt: skip
def test_one_update_moves_the_policy_where_the_peer_does(seed, target_kl, cg_damping):
    model = peer_model(target_kl, cg_damping, seed)
    policy, _ = natgrad_copy(model)
    gen = torch.Generator().manual_seed(seed + 100)
    obs = torch.randn(N, OBS_DIM, generator=gen) * 2.0
    with torch.no_grad():
        acts = policy(obs).sample()
    # advantages that the policy can follow: a smooth function of state and action
    raw_adv = (acts[:, 0] * obs[:, 0] - acts[:, 1] + 0.3 * torch.randn(N, generator=gen)).numpy()
    fill_buffer(model, obs, acts, raw_adv.astype(np.float32))
    before = actor_vector(model)
    assert torch.equal(before, natgrad_vector(policy))

    model.train()
    peer_step = actor_vector(model) - before

    adv = torch.as_tensor(raw_adv)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # the trainer's whitening, as the peer's
    with torch.no_grad():
        old_log_probs = log_prob(policy(obs), acts)
    options = CGTRPOOptions(max_kl=ACT_DIM * target_kl, cg_damping=ACT_DIM * cg_damping,
                            cg_iters=25, backtrack_coeff=0.8)  # fmt: skip
    stats = CGTRPO(policy, options).update(obs, acts, old_log_probs, adv)
    our_step = natgrad_vector(policy) - before

    assert stats["step_accepted"] == 1.0 and stats["backtracks"] == 0.0
    assert peer_step.norm() > 1e-3  # the peer moved, the comparison is not between two zeros
    # float32 rounding apart (measured: a few 1e-6 of the step's norm), the same step
    assert float((our_step - peer_step).norm() / peer_step.norm()) < 1e-4


@pytest.fixture
def zero_std_allowed():
    """A zero standard deviation makes both sides act with the policy mean, bit for bit."""
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    yield
    torch.distributions.Distribution.set_default_validate_args(before)


def test_a_rollout_records_what_the_peers_rollout_records(zero_std_allowed):
    steps, envs, seed, gamma, lam = 256, 2, 3, 0.99, 0.95  # Pendulum truncates at 200 steps
    venv = VecNormalize(sb3_make_vec_env("Pendulum-v1", n_envs=envs, seed=seed), gamma=gamma)
    model = TRPO("MlpPolicy", venv, n_steps=steps, batch_size=steps, gamma=gamma,
                 gae_lambda=lam, seed=seed, device="cpu")  # fmt: skip
    model.set_logger(configure(None, [""]))
    with torch.no_grad():
        model.policy.log_std.fill_(-200.0)  # exp underflows to 0: actions are the mean
    _, callback = model._setup_learn(steps * envs, None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=steps)
    peer = model.rollout_buffer

    policy, critic = natgrad_copy(model)
    collector = Collector(make_vec_env("Pendulum-v1", envs), ObsNormalizer((3,)),
                          RewardScaler(envs, gamma), gamma)  # fmt: skip
    collector.reset(seed)
    buffer = RolloutBuffer(steps, envs, (3,), (1,), discrete=False)
    collector.collect(policy, critic, buffer, torch.Generator().manual_seed(0))
    batch = buffer.batch(gamma, lam)

    def same(ours, their, atol=1e-6):
        their = np.asarray(their, dtype=np.float64)  # the peer's (steps, envs, ...) layout
        their = their.reshape(their.shape[0], envs, -1)
        ours = np.asarray(ours, dtype=np.float64).reshape(their.shape)
        return np.abs(ours - their).max(-1) <= atol

    assert same(buffer.obs.numpy(), peer.observations).all()
    assert same(buffer.acts.numpy(), peer.actions).all()
    assert same(buffer.values.numpy(), peer.values).all()
    done = buffer.dones.numpy()
    assert done.sum() == envs and done[199].all()  # each env's episode truncated at step 200
    assert (done[:-1] == peer.episode_starts[1:]).all()  # the peer flags the next step
    # the truncated step's bootstrap gamma V(final obs): sb3 normalizes the final
    # observation with the statistics after this step's update, natgrad with those before
    rewards = same(buffer.rewards.numpy(), peer.rewards)
    assert rewards[~done].all()
    assert same(buffer.rewards.numpy(), peer.rewards, atol=0.05)[done].all()
    adv = batch.advantages.numpy().reshape(steps, envs)
    assert np.abs(adv - peer.advantages).max() < 0.05
    assert same(adv[200:], peer.advantages[200:]).all()  # after the episode: identical
    ret = batch.returns.numpy().reshape(steps, envs)
    assert same(ret[200:], peer.returns[200:]).all()
