"""benchmarks/rl/tune.py: search spaces, the batch layout and the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from bench import load_benchmark

pytest.importorskip("gymnasium")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "rl"


tune = load_benchmark("rl/tune.py")


def test_layout_splits_the_batch_into_envs_and_steps():
    assert tune.expand({"layout": "2x1024", "damping": 0.5}) == {
        "num_envs": 2,
        "num_steps": 1024,
        "damping": 0.5,
    }
    assert tune.expand({"max_kl": 0.01}) == {"max_kl": 0.01}
    for layout in tune.SPACES["mujoco-narrow"]["layout"][1]:
        fields = tune.expand({"layout": layout})
        assert fields["num_envs"] * fields["num_steps"] == 2048  # one batch size


def test_the_first_trial_of_every_space_is_natgrads_defaults():
    from natgrad.rl import TrainConfig

    config = TrainConfig()
    flat = {**config.to_dict(), **config.to_dict()["options"]}
    for space in tune.SPACES:
        trial = tune.expand(tune.defaults_as_trial(space))
        assert trial == {k: flat[k] for k in trial}, space
        # the defaults lie inside the space searched
        for name, value in tune.defaults_as_trial(space).items():
            kind, values = tune.SPACES[space][name]
            if kind == "categorical":
                assert value in values, (space, name)
            else:
                assert values[0] <= value <= values[1], (space, name)


def test_the_command_line_refuses_evaluation_seeds_and_unknown_settings(monkeypatch, capsys):
    for argv, message in [
        (["--family", "mujoco", "--seeds", "3"], "tuning seeds must be >= 100"),
        (
            ["--family", "mujoco", "--space", "mujoco-narrow", "--enqueue", '{"gamma": 0.9}'],
            "not in the space 'mujoco-narrow'",
        ),
        (["--family", "mujoco", "--enqueue", "{damping: 1}"], "--enqueue"),
    ]:
        monkeypatch.setattr(sys, "argv", ["tune.py", *argv])
        with pytest.raises(SystemExit) as stop:
            tune.main()
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
