"""Building blocks of natgrad.rl: GAE, normalization, policies, checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from gymnasium import spaces  # noqa: E402

from natgrad import RATNaturalGradient  # noqa: E402
from natgrad.distributions import log_prob, sample  # noqa: E402
from natgrad.rl.checkpoint import atomic_write, load_checkpoint, save_checkpoint  # noqa: E402
from natgrad.rl.gae import compute_gae  # noqa: E402
from natgrad.rl.normalize import ObsNormalizer, RewardScaler, RunningMeanStd  # noqa: E402
from natgrad.rl.policies import build_actor_critic  # noqa: E402


def _gae_reference(rewards, values, dones, last_value, gamma, lam):
    steps, envs = rewards.shape
    adv = np.zeros((steps, envs))
    for e in range(envs):
        for t in range(steps):
            total, discount = 0.0, 1.0
            for k in range(t, steps):
                next_v = last_value[e] if k == steps - 1 else values[k + 1, e]
                nonterminal = 0.0 if dones[k, e] else 1.0
                delta = rewards[k, e] + gamma * next_v * nonterminal - values[k, e]
                total += discount * delta
                if dones[k, e]:
                    break
                discount *= gamma * lam
            adv[t, e] = total
    return adv


def test_gae_matches_direct_sum():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    values = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    dones = torch.rand(7, 3, generator=gen) < 0.3
    last = torch.randn(3, generator=gen, dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, dones, last, 0.9, 0.8)
    ref = _gae_reference(rewards.numpy(), values.numpy(), dones.numpy(), last.numpy(), 0.9, 0.8)
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, adv + values)


def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(300, 4))
    rms = RunningMeanStd((4,), epsilon=0.0 + 1e-12)
    for chunk in np.array_split(data, 7):
        rms.update(chunk)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-9)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-6)


def test_normalizers_round_trip_state():
    rng = np.random.default_rng(1)
    norm = ObsNormalizer((3,))
    norm(rng.normal(size=(10, 3)), update=True)
    scaler = RewardScaler(2, 0.99)
    scaler(np.array([1.0, 2.0]), np.array([False, True]))
    norm2, scaler2 = ObsNormalizer((3,)), RewardScaler(2, 0.99)
    norm2.load_state_dict(norm.state_dict())
    scaler2.load_state_dict(scaler.state_dict())
    x = rng.normal(size=(4, 3))
    np.testing.assert_array_equal(norm(x, update=False), norm2(x, update=False))
    r, d = np.array([0.5, -1.0]), np.array([False, False])
    np.testing.assert_array_equal(scaler(r, d), scaler2(r, d))


def test_disabled_normalizers_are_identity():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(ObsNormalizer((3,), enabled=False)(x, update=True), x)
    r = np.array([3.0, -2.0])
    np.testing.assert_array_equal(RewardScaler(2, 0.9, enabled=False)(r, [False, True]), r)


SPACES = {
    "box-discrete": (spaces.Box(-1, 1, (5,)), spaces.Discrete(3)),
    "box-box": (spaces.Box(-1, 1, (5,)), spaces.Box(-2, 2, (2,))),
    "image-discrete": (spaces.Box(0, 1, (10, 10, 4)), spaces.Discrete(6)),
}


@pytest.mark.parametrize("case", list(SPACES))
def test_policies_sample_deterministically_and_support_rat(case):
    obs_space, act_space = SPACES[case]
    policy, critic = build_actor_critic(
        obs_space, act_space, (16, 16), torch.Generator().manual_seed(0)
    )
    again, _ = build_actor_critic(obs_space, act_space, (16, 16), torch.Generator().manual_seed(0))
    for a, b in zip(policy.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    obs = torch.rand((32, *obs_space.shape), generator=torch.Generator().manual_seed(1))
    dist = policy(obs)
    acts = sample(dist, torch.Generator().manual_seed(2))
    torch.testing.assert_close(acts, sample(dist, torch.Generator().manual_seed(2)))
    assert log_prob(dist, acts).shape == (32,)
    assert critic(obs).shape == (32,)
    rat = RATNaturalGradient(solver="cholesky", damping=1e-2)
    rat(policy, obs, acts, torch.randn(32))
    assert rat.diagnostics.score_path == "vmap"


def test_policy_build_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    build_actor_critic(spaces.Box(-1, 1, (4,)), spaces.Discrete(2), (8,), torch.Generator())
    assert torch.equal(state, torch.random.get_rng_state())


def test_unsupported_space_error():
    from natgrad.rl import ConfigError

    with pytest.raises(ConfigError, match="action space"):
        build_actor_critic(spaces.Box(-1, 1, (4,)), spaces.MultiBinary(3), (8,), torch.Generator())


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 16, 16), r"H=3, W=16, C=16; C is larger than H or W, so it looks channel-first"),
        ((4, 84, 84), "looks channel-first .*transpose\\(1, 2, 0\\)"),
        ((1, 1, 3), "looks channel-first"),
        ((2, 8, 1), r"3x3 convolution needs H and W >= 3"),
    ],
)
def test_an_image_the_channels_last_cnn_would_misread_is_refused(shape, message):
    from natgrad.rl import ConfigError

    space = spaces.Box(0, 255, shape, np.uint8)
    with pytest.raises(ConfigError, match=message):
        build_actor_critic(space, spaces.Discrete(2), (8,), torch.Generator())
    for fine in [(16, 16, 3), (10, 10, 10), (3, 3, 1)]:  # channels last, as MinAtar
        build_actor_critic(spaces.Box(0, 1, fine), spaces.Discrete(2), (8,), torch.Generator())


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_an_integer_box_action_space_is_refused(dtype):
    from natgrad.rl import ConfigError

    space = spaces.Box(0, 1, (2,), dtype)
    with pytest.raises(ConfigError, match=f"has dtype {np.dtype(dtype)}.*float Box action space"):
        build_actor_critic(spaces.Box(-1, 1, (4,)), space, (8,), torch.Generator())


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"value": 1})

    def broken_write(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken_write)
    assert load_checkpoint(path)["value"] == 1
    # no temporary file left behind
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "checkpoint.pt"]


def test_a_module_qualified_env_id_imports_its_module(tmp_path, monkeypatch, capsys):
    """gymnasium's ``"module:Env-v0"`` form (how a custom env is reached from the command
    line) was refused as an unknown environment."""
    from natgrad.cli import main
    from natgrad.rl import ConfigError
    from natgrad.rl.envs import make_env

    (tmp_path / "natgrad_tmp_envs.py").write_text(
        "import gymnasium\n"
        "gymnasium.register('NatgradTmpCartPole-v0', "
        "entry_point='gymnasium.envs.classic_control:CartPoleEnv', max_episode_steps=50)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    env_id = "natgrad_tmp_envs:NatgradTmpCartPole-v0"
    make_env(env_id).close()
    argv = ["train", "--env", env_id, "--steps", "128", "--num-envs", "2", "--num-steps", "64"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress", "--no-tensorboard"]) == 0
    capsys.readouterr()
    with pytest.raises(ConfigError, match="names the module 'natgrad_no_such_module'"):
        make_env("natgrad_no_such_module:Foo-v0")


def test_an_env_needing_a_package_natgrad_does_not_ship_keeps_gymnasiums_hint(monkeypatch):
    import gymnasium as gym

    from natgrad.rl import ConfigError
    from natgrad.rl.envs import make_env

    def missing(*args, **kwargs):
        raise gym.error.DependencyNotInstalled(
            'Box2D is not installed, run `pip install "gymnasium[box2d]"`'
        )

    monkeypatch.setattr(gym, "make", missing)
    with pytest.raises(
        ConfigError, match=r"needs a package that is not installed .*gymnasium\[box2d\]"
    ):
        make_env("CartPole-v1")


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    """mkstemp's 0600 made every checkpoint, policy and config unreadable to the group."""
    atomic_write(tmp_path / "a.bin", lambda handle: handle.write(b"x"))
    with open(tmp_path / "b.bin", "wb") as handle:
        handle.write(b"x")
    assert (tmp_path / "a.bin").stat().st_mode == (tmp_path / "b.bin").stat().st_mode


def test_an_unsupported_space_leaves_no_run_directory(tmp_path, monkeypatch):
    from natgrad.rl import ConfigError, TrainConfig, Trainer

    (tmp_path / "natgrad_tmp_int_box.py").write_text(
        "import gymnasium, numpy as np\n"
        "class IntBox(gymnasium.Env):\n"
        "    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)\n"
        "    action_space = gymnasium.spaces.Box(0, 3, (2,), np.int64)\n"
        "    def reset(self, *, seed=None, options=None):\n"
        "        super().reset(seed=seed)\n"
        "        return self.observation_space.sample(), {}\n"
        "    def step(self, action):\n"
        "        return self.observation_space.sample(), 0.0, False, False, {}\n"
        "gymnasium.register('NatgradTmpIntBox-v0', entry_point=IntBox, max_episode_steps=10)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="float Box action space"):
        Trainer(TrainConfig(env="natgrad_tmp_int_box:NatgradTmpIntBox-v0"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
