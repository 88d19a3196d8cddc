"""benchmarks/rl/peer_kl.py: sb3-contrib TRPO's KL constraint in natgrad's units."""

from __future__ import annotations

import numpy as np
import pytest
from bench import load_benchmark

pytest.importorskip("sb3_contrib")
gym = pytest.importorskip("gymnasium")

ENV_ID = "NatgradTestBox4-v0"


class Box4(gym.Env):
    """Continuous control with 4 action dimensions and random observations (no MuJoCo)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_the_peer_constrains_the_kl_per_action_dimension(monkeypatch):
    peer_kl = load_benchmark("rl/peer_kl.py")
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point=Box4, max_episode_steps=50)
    zoo = {"n_envs": 2, "normalize": True, "n_steps": 64, "batch_size": 64, "target_kl": 0.05}
    monkeypatch.setitem(peer_kl.ZOO_TRPO, ENV_ID, zoo)
    row = peer_kl.kl_factor(ENV_ID, perturbations=3, seed=0)
    assert row["action_dim"] == 4
    assert row["per_dimension_kl_shape"] == [512, 4]  # one KL per sample and dimension
    assert row["ratio_min"] == pytest.approx(4.0, rel=1e-5)
    assert row["ratio_max"] == pytest.approx(4.0, rel=1e-5)
    assert row["effective_max_kl"] == pytest.approx(0.2, rel=1e-5)
    assert row["zoo_cg_damping"] == 0.1  # sb3-contrib's default: the zoo entry sets none
    assert row["effective_damping"] == pytest.approx(0.4, rel=1e-5)
    monkeypatch.setitem(peer_kl.ZOO_TRPO, ENV_ID, {"n_steps": 64, "batch_size": 64})
    default = peer_kl.kl_factor(ENV_ID, perturbations=1, seed=0)
    assert default["zoo_target_kl"] == 0.01  # sb3-contrib's default where the zoo sets none


def test_the_record_checks_what_the_conversion_relies_on(monkeypatch, tmp_path):
    peer_kl = load_benchmark("rl/peer_kl.py")
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point=Box4, max_episode_steps=50)
    monkeypatch.setitem(peer_kl.ZOO_TRPO, ENV_ID, {"n_steps": 64, "batch_size": 64})
    out = tmp_path / "peer_kl.json"
    data = peer_kl.main(["--envs", ENV_ID, "--perturbations", "1", "--out", str(out)])
    # sb3-contrib's TRPO takes the mean KL and damps its Hessian: the conversion holds
    assert data["train_constrains_mean_of_kl_divergence"] is True
    assert data["hessian_vector_product_adds_cg_damping"] is True
    assert out.exists() and data["envs"][ENV_ID]["effective_damping"] == pytest.approx(0.4)
