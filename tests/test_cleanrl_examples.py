"""Smoke tests of the CleanRL-style scripts in examples/cleanrl at a tiny budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tyro")
pytest.importorskip("tensorboard")
pytest.importorskip("gymnasium")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cleanrl"
TINY = ["--no-cuda", "--num-steps", "128", "--vf-epochs", "1", "--vf-num-minibatches", "2"]


def run_script(name: str, args: list[str], cwd: Path, **env: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **env}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *TINY, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def scalar_tags(runs: Path) -> set[str]:
    """Scalar tags of the one TensorBoard run under ``runs`` (env ids may contain a slash)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = runs.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file.parent))
    events.Reload()
    return set(events.Tags()["scalars"])


CHARTS = {"charts/episodic_return", "charts/SPS", "losses/approx_kl", "rat/step_size"}


def test_continuous_action_script_tracks_offline(tmp_path):
    pytest.importorskip("wandb")
    args = ["--env-id", "Pendulum-v1", "--total-timesteps", "512", "--track"]
    stdout = run_script("npg_rat_continuous_action.py", args, tmp_path, WANDB_MODE="offline")
    assert "episodic_return=" in stdout and "SPS:" in stdout
    assert CHARTS <= scalar_tags(tmp_path / "runs")
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_minatar_script(tmp_path):
    pytest.importorskip("minatar")
    args = ["--env-id", "MinAtar/Breakout-v1", "--total-timesteps", "512", "--num-envs", "2"]
    stdout = run_script("npg_rat_minatar.py", args, tmp_path)
    assert "episodic_return=" in stdout and "SPS:" in stdout
    assert CHARTS <= scalar_tags(tmp_path / "runs")


CONTINUOUS, MINATAR = "npg_rat_continuous_action.py", "npg_rat_minatar.py"
# 16 steps in 32 critic minibatches: minibatch size 0, range() crashed after a rollout
TOO_MANY_MINIBATCHES = ["--num-envs", "1", "--num-steps", "16", "--vf-num-minibatches", "32"]


# each case starts a script (~8 s of imports): every check in one script, one in the other
@pytest.mark.parametrize(
    ("script", "args", "flag"),
    [
        (CONTINUOUS, TOO_MANY_MINIBATCHES, "--vf"),
        (CONTINUOUS, ["--vf-num-minibatches", "0"], "--vf-num-minibatches=0"),
        # less than one rollout: exited 0 having trained nothing
        (CONTINUOUS, ["--total-timesteps", "10"], "--total-timesteps=10"),
        (MINATAR, TOO_MANY_MINIBATCHES, "--vf"),
    ],
)
def test_flags_that_cannot_train_are_refused_before_anything_runs(tmp_path, script, args, flag):
    if script == "npg_rat_minatar.py":
        pytest.importorskip("minatar")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *TINY, "--env-id", "Pendulum-v1", *args],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and flag in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
