"""Exact resume for the algorithms tests/test_rl_train.py does not cover: vpg, a2c, cg-trpo.

vpg and a2c carry Adam moments, cg-trpo carries nothing of its own: a resume must restore
the step, the update count, the optimizer and every generator, so that the resumed run
logs the same rows and ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("gymnasium")

from natgrad.rl import TrainConfig, Trainer  # noqa: E402
from natgrad.rl.logger import read_progress  # noqa: E402

SMALL = dict(num_envs=4, num_steps=64, hidden=(16, 16), critic_epochs=2, checkpoint_every=1)
TIMING = {"wall_time", "steps_per_sec", "solver_seconds"}


def _rows(run_dir):
    return [
        {k: v for k, v in row.items() if k not in TIMING}
        for row in read_progress(run_dir / "progress.csv")
    ]


def _run(out, **overrides):
    trainer = Trainer(TrainConfig.from_dict({**SMALL, **overrides}), out, tensorboard=False)
    trainer.run(progress=False)
    trainer.close()
    return trainer


@pytest.mark.parametrize(
    ("env", "algo"), [("CartPole-v1", "vpg"), ("Pendulum-v1", "a2c"), ("CartPole-v1", "cg-trpo")]
)
def test_resume_equals_uninterrupted_run(tmp_path, env, algo):
    whole = _run(tmp_path / "whole", env=env, algo=algo, steps=1024)
    _run(tmp_path / "split", env=env, algo=algo, steps=512)
    resumed = Trainer(
        None, tmp_path / "split", resume=True, steps=1024, tensorboard=False, trust_env_state=True
    )
    # Restored, not restarted with the same seed (which would reach the same numbers too).
    assert (resumed.global_step, resumed.iteration) == (512, 2)
    resumed.run(progress=False)
    resumed.close()
    rows_whole, rows_resumed = _rows(tmp_path / "whole"), _rows(tmp_path / "split")
    assert [r["step"] for r in rows_resumed] == [256, 512, 768, 1024]
    for a, b in zip(rows_whole, rows_resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], key
    for module in ("policy", "critic"):
        pairs = zip(
            getattr(whole, module).parameters(), getattr(resumed, module).parameters(), strict=True
        )
        assert all(torch.equal(pw, pr) for pw, pr in pairs), module
