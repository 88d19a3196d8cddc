"""natgrad.sb3: RATTRPO/RATNPG as SB3 algorithms, their update, and the rl-zoo3 wrapper."""

from __future__ import annotations

import copy
import importlib
import math
import sys
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from reference import dense_natural_gradient, dense_scores

pytest.importorskip("stable_baselines3")

from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.envs import FakeImageEnv, SimpleMultiObsEnv  # noqa: E402
from stable_baselines3.common.logger import configure  # noqa: E402

from natgrad import NatgradError, RATNaturalGradient  # noqa: E402
from natgrad.errors import MissingExtraError  # noqa: E402
from natgrad.sb3 import RATNPG, RATTRPO, UnsupportedArgumentError  # noqa: E402
from natgrad.sb3._base import sb3_log_prob  # noqa: E402
from natgrad.sb3._errors import InvalidArgumentError  # noqa: E402

SMALL = {"n_steps": 64, "batch_size": 32, "n_critic_updates": 2, "seed": 0, "device": "cpu"}


def tiny_image_env():
    return FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True)


def cnn_kwargs():
    return {"features_extractor_kwargs": {"features_dim": 16}}


CASES = {
    "mlp-cartpole-trpo": (RATTRPO, "MlpPolicy", lambda: gym.make("CartPole-v1"), {}),
    "mlp-pendulum-npg": (RATNPG, "MlpPolicy", lambda: gym.make("Pendulum-v1"), {}),
    "mlp-pendulum-sde-trpo": (
        RATTRPO,
        "MlpPolicy",
        lambda: gym.make("Pendulum-v1"),
        {"use_sde": True, "sde_sample_freq": 4},
    ),
    "cnn-image-trpo": (RATTRPO, "CnnPolicy", tiny_image_env, {"policy_kwargs": cnn_kwargs()}),
    "multiinput-dict-npg": (
        RATNPG,
        "MultiInputPolicy",
        lambda: SimpleMultiObsEnv(random_start=False),
        {"policy_kwargs": {"features_extractor_kwargs": {"cnn_output_dim": 8}}},
    ),
}


def observations(model, n=16):
    space = model.observation_space
    space.seed(1)
    samples = [space.sample() for _ in range(n)]
    if isinstance(samples[0], dict):
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    return np.stack(samples)


@pytest.mark.parametrize("case", list(CASES))
def test_learn_save_load_predict(case, tmp_path):
    """SB3's own pattern: learn briefly, save, load, identical predictions, learn on."""
    cls, policy, make_env, extra = CASES[case]
    model = cls(policy, make_env(), **SMALL, **extra)
    before = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
    model.learn(128)
    assert model._n_updates == 2
    moved = [n for n, p in model.policy.named_parameters() if not torch.equal(p, before[n])]
    assert set(model.actor_parameter_names(model._policy_batch())) <= set(moved)
    assert model.logger.name_to_value["train/rat_converged"] == 1.0

    path = tmp_path / "model.zip"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        data = archive.read("data").decode()
    assert '"rat"' not in data and "_actor_names" not in data and '"damping"' in data

    loaded = cls.load(path, env=make_env(), device="cpu")
    assert isinstance(loaded.rat, RATNaturalGradient) and loaded.rat is not model.rat
    assert loaded.rat.damping == model.rat.damping and loaded.rat.tol == model.rat.tol
    obs = observations(model)
    expected, _ = model.predict(obs, deterministic=True)
    actual, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actual, expected)
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded._n_updates == 3


def test_load_rebuilds_rat_with_overrides(tmp_path):
    """Keywords given to load (e.g. damping) reach the rebuilt RATNaturalGradient."""
    model = RATNPG("MlpPolicy", "CartPole-v1", damping=0.3, **SMALL)
    model.save(tmp_path / "m")
    assert RATNPG.load(tmp_path / "m").rat.damping == 0.3
    assert RATNPG.load(tmp_path / "m", damping=0.05).rat.damping == 0.05


def test_load_refuses_trpo_and_unknown_keywords(tmp_path):
    """SB3 would store any load keyword as a dead attribute: refused as in the constructor."""
    model = RATNPG("MlpPolicy", "CartPole-v1", **SMALL)
    model.save(tmp_path / "m")
    with pytest.raises(UnsupportedArgumentError, match="rename cg_damping=<value> to damping"):
        RATNPG.load(tmp_path / "m", cg_damping=0.05)
    with pytest.raises(UnsupportedArgumentError, match="unexpected keyword argument 'dampng'"):
        RATNPG.load(tmp_path / "m", dampng=0.05)
    assert RATNPG.load(tmp_path / "m", device="cpu", target_kl=0.02).target_kl == 0.02


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def test_npg_update_is_the_exact_natural_gradient_step():
    """One RATNPG update moves the actor by eta * (F + lam I)^{-1} g, F and g dense float64.

    The reference builds J from per-sample gradients taken one sample at a time with
    autograd, solves the P x P system, and takes eta = sqrt(2 target_kl / d^T F d).
    """
    damping, target_kl = 0.1, 0.02
    model = RATNPG(
        "MlpPolicy",
        "Pendulum-v1",
        n_steps=24,
        batch_size=24,
        n_critic_updates=1,
        target_kl=target_kl,
        damping=damping,
        solver="cholesky",
        policy_kwargs={"net_arch": [4]},
        seed=3,
        device="cpu",
    )
    theta0 = copy.deepcopy(model.policy)
    model.learn(24)  # exactly one rollout and one update
    batch = model._policy_batch()  # the same buffer the update used
    names = model.actor_parameter_names(batch)
    assert "log_std" in names and not any("value" in n for n in names)
    params0 = dict(theta0.named_parameters())
    scores = dense_scores(
        theta0, sb3_log_prob, batch.obs, batch.acts, [params0[n] for n in names], 24
    )
    d = dense_natural_gradient(scores, batch.adv, damping)
    eta = math.sqrt(2 * target_kl / float(d @ (scores.T @ (scores @ d)) / 24))
    params1 = dict(model.policy.named_parameters())
    change = flat(params1[n] for n in names) - flat(params0[n] for n in names)
    assert float(change.norm()) > 1e-2
    torch.testing.assert_close(change, eta * d, rtol=2e-4, atol=1e-6)
    value_names = [n for n in params0 if n not in names]
    assert value_names and all(
        not torch.equal(params0[n], params1[n]) for n in value_names if "value" in n
    )


def test_trpo_line_search_respects_target_kl():
    model = RATTRPO("MlpPolicy", "CartPole-v1", target_kl=0.005, **SMALL)
    model.learn(192)
    logged = model.logger.name_to_value
    assert logged["train/kl_divergence_loss"] <= 0.005
    assert logged["train/is_line_search_success"] in (0.0, 1.0)


@pytest.mark.parametrize(
    ("keyword", "value", "fix"),
    [
        ("cg_damping", 0.1, "damping=<value>"),
        ("cg_max_steps", 15, "remove cg_max_steps"),
        ("learning_rate_actor", 1.0, "unexpected keyword argument 'learning_rate_actor'"),
    ],
)
def test_trpo_only_keywords_are_refused_with_the_fix(keyword, value, fix):
    with pytest.raises(UnsupportedArgumentError, match=keyword) as info:
        RATTRPO("MlpPolicy", "CartPole-v1", **{keyword: value})
    assert fix in str(info.value)
    assert isinstance(info.value, NatgradError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_kl": 0.0}, InvalidArgumentError, "target_kl=0.0"),
        ({"rat_kwargs": {"seed": 1}}, UnsupportedArgumentError, "rat_kwargs key 'seed'"),
        ({"damping": -1.0}, ValueError, "damping"),
        ({"solver": "lbfgs"}, ValueError, "solver"),
        ({"line_search_shrinking_factor": 1.5}, InvalidArgumentError, "(0, 1)"),
        ({"line_search_shrinking_factor": "a"}, InvalidArgumentError, "(0, 1)"),
        ({"target_kl": "0.01"}, InvalidArgumentError, "target_kl='0.01'"),
        ({"target_kl": None}, InvalidArgumentError, "target_kl=None"),
        ({"rat_kwargs": "x"}, InvalidArgumentError, "pass a dict"),
        ({"learning_rate": -1}, InvalidArgumentError, "learning_rate=-1"),
        ({"batch_size": True}, InvalidArgumentError, "batch_size=True"),
        ({"sub_sampling_factor": 64, "n_steps": 64}, InvalidArgumentError, "sees 1 sample"),
        # these reached SB3's rollout buffer as bare TypeError/ValueError/UnboundLocalError
        ({"n_steps": 0, "normalize_advantage": False}, InvalidArgumentError, "n_steps=0"),
        ({"n_steps": -3, "normalize_advantage": False}, InvalidArgumentError, "n_steps=-3"),
        ({"n_steps": 1.5}, InvalidArgumentError, "n_steps=1.5"),
        ({"n_steps": "64"}, InvalidArgumentError, "n_steps='64'"),
        ({"gamma": "x"}, InvalidArgumentError, r"gamma='x'; pass a float in \[0, 1\]"),
        ({"gamma": float("nan")}, InvalidArgumentError, "gamma=nan"),
        ({"gae_lambda": 2.0}, InvalidArgumentError, "gae_lambda=2.0"),
    ],
)
def test_bad_values_raise_natgrad_errors(kwargs, error, match):
    with pytest.raises(error, match=match) as refused:
        RATTRPO("MlpPolicy", "CartPole-v1", **kwargs)
    assert isinstance(refused.value, NatgradError)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"batch_size": 0}, "batch_size=0"),  # hung the critic's minibatch loop
        ({"sub_sampling_factor": 0}, "sub_sampling_factor=0"),
        ({"n_critic_updates": -5}, "n_critic_updates=-5"),
        ({"target_kl": -1}, "target_kl=-1"),
        ({"line_search_max_iter": 0}, "line_search_max_iter=0"),
        ({"rat_kwargs": "streaming"}, "rat_kwargs='streaming'; pass a dict"),
    ],
)
def test_load_overrides_get_the_constructors_checks(tmp_path, override, match):
    RATTRPO("MlpPolicy", "CartPole-v1", **SMALL).save(tmp_path / "m")
    with pytest.raises(InvalidArgumentError, match=match):
        RATTRPO.load(tmp_path / "m", env=gym.make("CartPole-v1"), **override)


def test_load_takes_rat_kwargs_none_as_the_constructor_does(tmp_path):
    """load(rat_kwargs=None) raised a bare TypeError ('NoneType' object is not iterable)."""
    RATNPG("MlpPolicy", "CartPole-v1", rat_kwargs={"backend": "streaming"}, **SMALL).save(
        tmp_path / "m"
    )
    loaded = RATNPG.load(tmp_path / "m", rat_kwargs=None)
    assert loaded.rat_kwargs == {} and loaded.rat.backend == "auto"


def test_load_for_evaluation_with_a_frozen_critic(tmp_path):
    # rl-zoo's ``enjoy`` loads with custom_objects={"learning_rate": 0.0, ...}
    RATTRPO("MlpPolicy", "CartPole-v1", **SMALL).save(tmp_path / "m")
    loaded = RATTRPO.load(tmp_path / "m", custom_objects={"learning_rate": 0.0})
    assert loaded.learning_rate == 0.0


def test_logs_rat_diagnostics_to_csv_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    model = RATTRPO("MlpPolicy", "CartPole-v1", **SMALL)
    model.set_logger(configure(str(tmp_path), ["csv", "tensorboard"]))

    class Count(BaseCallback):
        rollouts = 0

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            Count.rollouts += 1

    model.learn(128, callback=Count())
    assert Count.rollouts == 2
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    for key in (
        "train/kl_divergence_loss",
        "train/step_size",
        "train/rat_solver",
        "train/rat_residual",
        "train/rat_iterations",
        "train/is_line_search_success",
    ):
        assert key in header
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_missing_sb3_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("natgrad.sb3")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "stable_baselines3", None)
    with pytest.raises(MissingExtraError, match=r"natgrad\[sb3\]"):
        importlib.import_module("natgrad.sb3")


def test_zoo_trains_and_enjoys_cartpole(tmp_path, capsys):
    pytest.importorskip("rl_zoo3")
    from natgrad.sb3 import zoo

    folder = str(tmp_path / "logs")
    common = ["--algo", "rat_trpo", "--env", "CartPole-v1", "-f", folder, "--seed", "0"]
    train = [*common, "-n", "256", "--eval-freq", "-1", "-params", "n_steps:64", "batch_size:64"]
    assert zoo.main(["train", *train]) == 0
    run = tmp_path / "logs" / "rat_trpo" / "CartPole-v1_1"
    assert (run / "CartPole-v1.zip").is_file()
    config = (run / "CartPole-v1" / "config.yml").read_text()
    assert "damping" in config and "n_critic_updates" in config  # the shipped YAML
    loaded = RATTRPO.load(run / "CartPole-v1.zip")
    assert loaded.n_steps == 64 and loaded._n_updates == 2
    assert zoo.main(["enjoy", *common, "-n", "50", "--no-render"]) == 0
    assert zoo.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_zoo_reports_a_trpo_keyword_in_one_line(tmp_path, capsys):
    pytest.importorskip("rl_zoo3")
    from natgrad.sb3 import zoo

    args = ["--algo", "rat_trpo", "--env", "CartPole-v1", "-f", str(tmp_path), "-n", "64"]
    assert zoo.main(["train", *args, "-params", "cg_damping:0.1"]) == 2
    err = capsys.readouterr().err
    assert "natgrad.sb3.zoo train: error: RATTRPO got cg_damping=0.1" in err
    assert "damping=<value>" in err and "Traceback" not in err


def test_zoo_failed_train_leaves_no_empty_log_folder(tmp_path, capsys):
    pytest.importorskip("rl_zoo3")
    from natgrad.sb3 import zoo

    folder = tmp_path / "logs"
    args = ["--algo", "rat_trpo", "--env", "CartPole-v1", "-f", str(folder), "-n", "64"]
    assert zoo.main(["train", *args, "-params", "cg_damping:0.1"]) == 2
    assert not folder.exists()  # rl-zoo3 made logs/rat_trpo/CartPole-v1_1 before the error
    # a folder that existed keeps what it held; only the failed run's directory goes
    kept = folder / "rat_trpo" / "CartPole-v1_1" / "0.monitor.csv"
    kept.parent.mkdir(parents=True)
    kept.write_text('#{"t_start": 0}\nr,l,t\n9.0,9,0.1\n')
    assert zoo.main(["train", *args, "-params", "cg_damping:0.1"]) == 2
    assert sorted(p.name for p in (folder / "rat_trpo").iterdir()) == ["CartPole-v1_1"]
    assert kept.read_text().endswith("9.0,9,0.1\n")
    with pytest.raises(ValueError, match="NoSuchEnv-v0"):  # rl-zoo3's own error, still raised
        zoo.main(["train", "--algo", "rat_trpo", "--env", "NoSuchEnv-v0", "-f", f"{tmp_path}/x"])
    assert not (tmp_path / "x").exists()
    capsys.readouterr()


def test_zoo_hyperparameter_files_load_for_both_algorithms():
    pytest.importorskip("rl_zoo3")
    import yaml

    from natgrad.sb3 import zoo

    for algo in zoo.ALGORITHMS:
        table = yaml.safe_load(zoo.hyperparams_path(algo).read_text())
        assert {"CartPole-v1", "Pendulum-v1", "Hopper-v5", "default"} <= set(table)
        assert all("cg_damping" not in v and "cg_max_steps" not in v for v in table.values())
