"""Training faults: faulty updates are rolled back bit for bit; kill -9 then resume is exact."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from natgrad import IllConditionedError  # noqa: E402
from natgrad.cli import main  # noqa: E402
from natgrad.rl import EnvOutputError, TrainConfig, Trainer, TrainingError  # noqa: E402
from natgrad.rl.checkpoint import load_checkpoint  # noqa: E402
from natgrad.rl.logger import read_progress  # noqa: E402

SMALL = dict(num_envs=2, num_steps=64, hidden=(8,), critic_epochs=1, steps=100_000)
TIMING = {"wall_time", "steps_per_sec", "solver_seconds"}


def _nan(policy):
    with torch.no_grad():
        next(policy.parameters()).fill_(math.nan)


def _huge(policy):
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.linspace(-30.0, 30.0, p.numel()).view_as(p))


def _raise(policy):
    raise IllConditionedError("damping 1e-12 is below the rounding level of the scores")


def _linalg(policy):
    raise torch.linalg.LinAlgError("linalg.cholesky: the input is not positive-definite")


def _faulty(trainer, fault):
    """Make the next updates take the real step, then suffer ``fault``."""
    update = trainer.algo.update

    def faulty(*args):
        stats = update(*args)
        fault(trainer.policy)
        return stats

    trainer.algo.update = faulty


# ppo has no KL target: a finite step, however large, is kept.
CASES = [("rat-npg", f) for f in (_nan, _huge, _raise, _linalg)] + [
    ("ppo", f) for f in (_nan, _raise)
]


@pytest.mark.parametrize(("algo", "fault"), CASES, ids=lambda c: getattr(c, "__name__", c))
def test_faulty_update_is_rolled_back_bit_for_bit(tmp_path, algo, fault):
    trainer = Trainer(TrainConfig(algo=algo, **SMALL), tmp_path, tensorboard=False)
    trainer.step()  # optimizer moments and generators are in use
    policy = copy.deepcopy(trainer.policy.state_dict())
    algo_state = copy.deepcopy(trainer.algo.state_dict())
    _faulty(trainer, fault)
    with pytest.warns(RuntimeWarning, match="update 2 .* rejected and rolled back"):
        row = trainer.step()
    for name, value in trainer.policy.state_dict().items():
        assert torch.equal(value, policy[name]), name
    after = trainer.algo.state_dict()
    if algo == "ppo":
        assert after["optimizer"]["state"].keys() == algo_state["optimizer"]["state"].keys()
        for key, moments in algo_state["optimizer"]["state"].items():
            for k, v in moments.items():
                assert torch.equal(after["optimizer"]["state"][key][k], v)
        assert torch.equal(after["generator"], algo_state["generator"])
    else:
        assert torch.equal(after["rat_generator"], algo_state["rat_generator"])
    assert row["update_rejected"] == 1.0 and row["rejected_updates"] == 1 and row["kl"] == 0.0
    trainer.algo.update = type(trainer.algo).update.__get__(trainer.algo)
    assert trainer.step()["update_rejected"] == 0.0 and trainer.consecutive_rejections == 0
    trainer.close()


def test_repeated_rejections_stop_the_run(tmp_path, capsys, monkeypatch):
    from natgrad.rl.algorithms import RatNPG

    monkeypatch.setattr(RatNPG, "update", lambda self, *args: _raise(self.policy))
    trainer = Trainer(TrainConfig(**SMALL), tmp_path / "api", tensorboard=False)
    with (
        pytest.warns(RuntimeWarning, match="rejected"),
        pytest.raises(TrainingError, match="3 consecutive policy updates were rejected"),
    ):
        trainer.run(progress=False)
    rows = read_progress(tmp_path / "api" / "progress.csv")
    assert [r["rejected_updates"] for r in rows] == [1, 2, 3]
    # The command line: one line, exit status 1.
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "cli"), "--num-envs", "2", "--num-steps", "64",
              "--no-progress", "--no-tensorboard"])  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("natgrad train: error: training stopped at step 384: 3 consecutive")
    assert "IllConditionedError: damping 1e-12" in err[-1] and "--damping" in err[-1]
    assert sum("rejected and rolled back" in line for line in err) == 3


def _same(a, b) -> bool:
    """Exact equality of nested dicts of tensors, arrays and numbers."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return bool(np.array_equal(a, b))


def _poisoned(step, what):
    def poisoned(acts):
        obs, reward, terminated, truncated, info = step(acts)
        if what == "reward":
            reward = reward.copy()
            reward[1] = math.nan
        else:
            obs = obs.copy()
            obs[0, 2] = math.inf
        return obs, reward, terminated, truncated, info

    return poisoned


@pytest.mark.parametrize("what", ["reward", "observation"])
def test_a_non_finite_env_output_stops_the_run_before_anything_learns_from_it(tmp_path, what):
    """One NaN reward used to poison the reward scaler for good (every later update was
    rejected, and the checkpoints kept the NaN statistics)."""
    trainer = Trainer(TrainConfig(**SMALL), tmp_path, tensorboard=False)
    trainer.step()
    state = copy.deepcopy(trainer.collector.state_dict())
    trainer.collector.env.step = _poisoned(trainer.collector.env.step, what)
    with pytest.raises(EnvOutputError, match=f"step returned a {what} with 1 NaN or infinite"):
        trainer.step()
    after = trainer.collector.state_dict()
    for key in ("obs_norm", "reward_scaler"):
        assert _same(after[key], state[key]), key  # nothing learned from the value
    assert all(bool(torch.isfinite(p).all()) for p in trainer.policy.parameters())
    trainer.close()


def test_tiny_damping_on_pendulum_never_dies_with_a_traceback(tmp_path, capsys):
    argv = ["train", "--env", "Pendulum-v1", "--damping", "1e-12", "--steps", "2048",
            "--num-envs", "4", "--num-steps", "128", "--hidden", "16", "--critic-epochs", "1",
            "--out", str(tmp_path), "--no-progress", "--no-tensorboard"]  # fmt: skip
    try:
        code = main(argv)
    except SystemExit as exc:  # stopped after repeated rejections
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and code in (0, 1), err
    if code == 1:
        assert err.strip().splitlines()[-1].startswith("natgrad train: error: training stopped")


def _rows(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_progress(run)]


@pytest.mark.slow
def test_kill_9_then_resume_continues_bit_for_bit(tmp_path):
    args = ["train", "--steps", "3072", "--num-envs", "2", "--num-steps", "64", "--hidden", "8",
            "--critic-epochs", "1", "--checkpoint-every", "2", "--no-progress",
            "--no-tensorboard"]  # fmt: skip
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "natgrad.cli", *args, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.prev.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed"
    saved = load_checkpoint(killed / "checkpoint.pt")
    logged = len(read_progress(killed / "progress.csv"))
    assert 0 < saved["iteration"] < 24 and logged <= saved["iteration"] + 2  # one interval
    main(["train", "--resume", "--trust-env-state", "--out", str(killed), "--no-progress",
          "--no-tensorboard"])  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert _rows(killed / "progress.csv") == _rows(tmp_path / "whole" / "progress.csv")
    resumed = load_checkpoint(killed / "checkpoint.pt")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    assert resumed["global_step"] == whole["global_step"] == 3072
    for part in ("policy", "critic"):
        for name, value in whole[part].items():
            assert torch.equal(resumed[part][name], value), name
    assert json.loads((killed / "config.json").read_text())["steps"] == 3072


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--steps", "100000", "--num-envs", "2", "--num-steps", "64", "--hidden",
            "8", "--critic-epochs", "1", "--checkpoint-every", "1", "--no-progress",
            "--no-tensorboard", "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "natgrad.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.prev.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # a cluster's preemption
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM; the last checkpoint (step "), err
    assert last.endswith(f") is intact: continue with --resume --out {run}")
    step = int(last.split("(step ")[1].split(")")[0])
    # (+ one update if the signal came between the file's rename and the trainer's record)
    assert load_checkpoint(run / "checkpoint.pt")["global_step"] in (step, step + 128)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    argv = ["train", "--resume", "--out", str(run), "--steps", str(step + 128), "--no-progress"]
    assert main([*argv, "--no-tensorboard"]) == 0
