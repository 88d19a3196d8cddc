"""The shared training loop: reproducibility, exact resume, and learning CartPole."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

pytest.importorskip("gymnasium")

from natgrad.rl import TrainConfig, Trainer, train  # noqa: E402
from natgrad.rl.logger import read_progress  # noqa: E402

SMALL = dict(num_envs=4, num_steps=64, hidden=(16, 16), critic_epochs=2, checkpoint_every=1)
# Columns that measure the machine, not the algorithm.
TIMING = {"wall_time", "steps_per_sec", "solver_seconds"}


def _rows(run_dir):
    return [
        {k: v for k, v in row.items() if k not in TIMING}
        for row in read_progress(run_dir / "progress.csv")
    ]


def _same(rows_a, rows_b):
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], key


def _run(out, **overrides):
    trainer = Trainer(TrainConfig.from_dict({**SMALL, **overrides}), out, tensorboard=False)
    trainer.run(progress=False)
    trainer.close()
    return trainer


@pytest.mark.parametrize(("env", "algo"), [("CartPole-v1", "rat-npg"), ("Pendulum-v1", "ppo")])
def test_same_seed_same_numbers(tmp_path, env, algo):
    a = _run(tmp_path / "a", env=env, algo=algo, steps=512, seed=3)
    b = _run(tmp_path / "b", env=env, algo=algo, steps=512, seed=3)
    _same(_rows(tmp_path / "a"), _rows(tmp_path / "b"))
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = _run(tmp_path / "c", env=env, algo=algo, steps=512, seed=4)
    pairs = zip(a.policy.parameters(), c.policy.parameters(), strict=True)
    assert any(not torch.equal(pa, pc) for pa, pc in pairs)


@pytest.mark.parametrize(
    ("env", "algo"),
    [("CartPole-v1", "rat-npg"), ("CartPole-v1", "ppo"), ("Pendulum-v1", "rat-trpo"),
     ("Pendulum-v1", "kfac")],
)  # fmt: skip
def test_resume_equals_uninterrupted_run(tmp_path, env, algo):
    _check_resume(tmp_path, env, algo)


def _check_resume(tmp_path, env, algo):
    whole = _run(tmp_path / "whole", env=env, algo=algo, steps=1024)
    _run(tmp_path / "split", env=env, algo=algo, steps=512)
    # Rows logged after the last checkpoint must be dropped on resume: fake one.
    with open(tmp_path / "split" / "progress.csv", "a") as handle:
        handle.write("99999" + "," * 5 + "\n")
    resumed = Trainer(
        None, tmp_path / "split", resume=True, steps=1024, tensorboard=False, trust_env_state=True
    )
    # The checkpoint was restored (not a fresh start with the same seed, which would also
    # reach the same final numbers).
    assert (resumed.global_step, resumed.iteration) == (512, 2)
    assert resumed.resume_note is None
    resumed.run(progress=False)
    resumed.close()
    _same(_rows(tmp_path / "whole"), _rows(tmp_path / "split"))
    for pw, pr in zip(whole.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(pw, pr)
    for pw, pr in zip(whole.critic.parameters(), resumed.critic.parameters(), strict=True):
        assert torch.equal(pw, pr)


def test_resume_without_trusting_env_state_reseeds_deterministically(tmp_path):
    _run(tmp_path / "a", steps=512)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = []
    for run in ("a", "b"):
        with pytest.warns(RuntimeWarning, match="re-seeded at step 512"):
            trainer = Trainer(None, tmp_path / run, resume=True, steps=768, tensorboard=False)
        assert (trainer.global_step, trainer.iteration) == (512, 2)
        trainer.run(progress=False)
        trainer.close()
        resumed.append((trainer, _rows(tmp_path / run)))
    (first, rows_first), (second, rows_second) = resumed
    _same(rows_first, rows_second)
    for pa, pb in zip(first.policy.parameters(), second.policy.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from natgrad.rl import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        Trainer(None, tmp_path, resume=True)


def test_the_python_api_does_not_overwrite_an_existing_run(tmp_path):
    """The CLI refused it, but train()/Trainer replaced a finished run's files silently."""
    from natgrad.rl import ConfigError

    train(TrainConfig(env="CartPole-v1", steps=256, **SMALL), tmp_path, tensorboard=False)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(TrainConfig(env="Pendulum-v1", steps=256, **SMALL), tmp_path, tensorboard=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files


@pytest.mark.slow
def test_rat_npg_learns_cartpole(tmp_path):
    # Default hyperparameters (those of `natgrad train`), small budget.
    result = train(TrainConfig(steps=30_720, seed=0), tmp_path / "run", tensorboard=False)
    assert result.best_return >= 150.0, result


def test_resume_mujoco_is_exact(tmp_path):
    # MuJoCo envs unpickle as fresh simulators: the checkpoint carries MjData and the RNG.
    pytest.importorskip("mujoco")
    _check_resume(tmp_path, "Hopper-v5", "rat-npg")


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    trainer = Trainer(TrainConfig(**SMALL, steps=256), tmp_path / "run", tensorboard=True)
    trainer.run(progress=False)
    trainer.close()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_progress_columns_first_seen_after_the_first_row_are_kept(tmp_path):
    """A rejected first update logs fewer metrics than an accepted one: the accepted update's
    solver columns must still reach progress.csv (the header widens), on resume too."""
    from natgrad.rl.logger import RunLogger, read_progress

    logger = RunLogger(tmp_path, tensorboard=False)
    logger.write({"step": 1, "update_rejected": 1.0})
    logger.write({"step": 2, "update_rejected": 0.0, "solver_residual": 1e-4})
    logger.write({"step": 3, "update_rejected": 0.0, "solver_residual": 2e-4, "kl": 0.01})
    logger.close()
    rows = read_progress(tmp_path / "progress.csv")
    assert [r["solver_residual"] for r in rows][1:] == [1e-4, 2e-4]
    assert math.isnan(rows[0]["solver_residual"]) and math.isnan(rows[1]["kl"])
    assert rows[2]["kl"] == 0.01
    resumed = RunLogger(tmp_path, resume_step=2, tensorboard=False)
    resumed.write({"step": 3, "update_rejected": 0.0, "solver_residual": 3e-4, "g_dot_d": 5.0})
    resumed.close()
    rows = read_progress(tmp_path / "progress.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["solver_residual"] == 3e-4 and rows[2]["g_dot_d"] == 5.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("CartPole-v1", r"got str; for an environment id write TrainConfig\(env='CartPole-v1'\)"),
        ({"env": "CartPole-v1"}, r"got dict; build one with TrainConfig.from_dict"),
        (3, "config must be a natgrad.rl.TrainConfig, got int"),
    ],
)
def test_a_config_that_is_no_train_config_is_refused(tmp_path, config, message):
    from natgrad.rl import ConfigError

    with pytest.raises(ConfigError, match=message):
        Trainer(config, tmp_path / "run", tensorboard=False)
    with pytest.raises(ConfigError, match=message):
        train(config, tmp_path / "run", tensorboard=False)
    assert not (tmp_path / "run").exists()


def test_steps_without_resume_is_refused_and_a_bad_resume_budget_is_named(tmp_path):
    from natgrad.rl import ConfigError

    with pytest.raises(ConfigError, match=r"applies to resume=True only.*TrainConfig\(steps="):
        Trainer(TrainConfig.from_dict(SMALL), tmp_path / "new", steps=5, tensorboard=False)
    assert not (tmp_path / "new").exists()
    _run(tmp_path / "a", steps=256)
    for steps in ("512", 600.5):
        with pytest.raises(ConfigError, match=r"--steps \(TrainConfig.steps\) must be an integer"):
            Trainer(None, tmp_path / "a", resume=True, steps=steps, tensorboard=False)
    with pytest.raises(ConfigError, match="--steps 128 is below the 256 steps"):
        Trainer(None, tmp_path / "a", resume=True, steps=128, tensorboard=False)


def test_a_learning_curve_that_cannot_be_written_warns_and_keeps_the_run(tmp_path, monkeypatch):
    """A full disk at the end-of-run figure raised a ConfigError blaming ``--out``."""
    import errno

    pytest.importorskip("matplotlib")
    from natgrad.rl import plotting

    real_write_output = plotting.write_output

    def disk_full(path, write, flag):
        def fail(handle):
            raise OSError(errno.ENOSPC, "No space left on device")

        real_write_output(path, fail, flag)

    monkeypatch.setattr(plotting, "write_output", disk_full)
    with pytest.warns(RuntimeWarning, match="the learning curve .* run itself is complete"):
        train(TrainConfig(env="CartPole-v1", steps=256, **SMALL), tmp_path, tensorboard=False)
    assert (tmp_path / "checkpoint.pt").exists()
    assert not (tmp_path / "learning_curve.png").exists()
