"""Hyperparameter presets per environment family: detection, precedence, recording, resume."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")

from natgrad.cli import build_parser, main  # noqa: E402
from natgrad.rl import ConfigError, TrainConfig, Trainer  # noqa: E402
from natgrad.rl.algorithms import PPOOptions, RatNPGOptions  # noqa: E402
from natgrad.rl.presets import (  # noqa: E402
    PRESETS,
    check_preset_values,
    env_key,
    preset_choices,
    preset_for_env,
)

ROOT = Path(__file__).resolve().parent.parent

TINY = ["--num-envs", "2", "--num-steps", "64", "--hidden", "8", "--critic-epochs", "1",
        "--no-progress", "--no-tensorboard"]  # fmt: skip
SMALL = dict(steps=128, num_envs=2, num_steps=64, hidden=(8,), critic_epochs=1)
TUNED = {"gamma": 0.97, "max_kl": 0.01}


@pytest.fixture
def tuned_classic(monkeypatch):
    """The ``classic`` preset with TUNED as its values (a tuning session's one-line edit)."""
    for key, value in TUNED.items():
        monkeypatch.setitem(PRESETS["classic"].values, key, value)
    return PRESETS["classic"]


@pytest.mark.parametrize(
    ("env", "family"),
    [
        ("CartPole-v1", "classic"),
        ("CartPole-v0", "classic"),
        ("Acrobot-v1", "classic"),
        ("MountainCar-v0", "classic"),
        ("MountainCarContinuous-v0", "classic"),
        ("Pendulum-v1", "classic"),
        ("Hopper-v5", "mujoco"),
        ("Hopper-v4", "mujoco"),
        ("Walker2d-v5", "mujoco"),
        ("HalfCheetah-v5", "mujoco"),
        ("Ant-v5", "mujoco"),
        ("Humanoid-v5", "mujoco"),
        ("HumanoidStandup-v5", "mujoco"),
        ("InvertedPendulum-v5", "mujoco"),
        ("InvertedDoublePendulum-v5", "mujoco"),
        ("Reacher-v5", "mujoco"),
        ("Pusher-v5", "mujoco"),
        ("Swimmer-v5", "mujoco"),
        ("MinAtar/Breakout-v1", "minatar"),
        ("MinAtar/SpaceInvaders-v1", "minatar"),
        ("LunarLander-v3", None),
        ("ALE/Breakout-v5", None),
        ("Custom/CartPole-v1", None),  # someone else's namespace, not gymnasium's
        ("Hopper", "mujoco"),
        ("CartPoleX-v1", None),
        ("my_package:CartPole-v1", "classic"),
        ("", None),
    ],
)
def test_the_family_is_picked_by_env_id(env, family):
    assert preset_for_env(env) == family


def test_the_registry_lists_every_family_with_its_source_and_plain_values():
    assert set(PRESETS) == {"classic", "mujoco", "minatar"}
    assert preset_choices() == ("auto", "none", "classic", "mujoco", "minatar")
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.description and preset.source
        assert type(preset.values) is dict  # the tuning session edits one dict literal
        assert type(preset.envs) is dict and all(type(v) is dict for v in preset.envs.values())
        check_preset_values(preset)
    assert PRESETS["classic"].values == {}
    assert PRESETS["classic"].source == "the defaults, tuned on CartPole"
    assert PRESETS["mujoco"].source.startswith("benchmarks/rl/results/tune/mujoco-3env.md")
    assert (ROOT / PRESETS["mujoco"].source.split(":")[0]).exists()  # the cited search
    cited = re.findall(r"results_\w+", PRESETS["mujoco"].source)  # the entries' evidence
    assert {"results_damping_tuning", "results_protocol_300k_walker2d_entry"} <= set(cited)
    assert all((ROOT / "benchmarks" / "rl" / folder).is_dir() for folder in cited)
    assert PRESETS["minatar"].source == "not tuned yet"


def test_the_docs_table_states_what_each_preset_sets():
    """docs/rl.md's preset table lists every env entry with its values, and no stale one."""
    rows = [line for line in (ROOT / "docs" / "rl.md").read_text().splitlines()
            if re.match(r"\| `(classic|mujoco|minatar)` \|", line)]  # fmt: skip
    for name, preset in PRESETS.items():
        documented = {row.split("|")[2].strip() for row in rows if f"| `{name}` |" in row}
        assert documented - {"all", "the family, Hopper"} == set(preset.envs), name
        assert not preset.values  # a family-wide value would need its own column
        for env, values in preset.envs.items():
            (row,) = [r for r in rows if r.startswith(f"| `{name}` | {env} |")]
            cells = row.split("|")[3]
            for key, value in values.items():
                assert f"`{key}` {value}" in cells, (env, key, value)
            assert cells.count("`") == 2 * len(values), (env, "a value the code does not set")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gama": 0.9}, "sets unknown option 'gama'; known: .*gamma"),
        ({"env": "Hopper-v5"}, "sets 'env', which chooses the run"),
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\], got 1.5"),
        ({"max_kl": "big"}, "max_kl must be a real number, got 'big' of type str"),
    ],
)
def test_a_bad_preset_value_is_a_clear_error(monkeypatch, values, message):
    monkeypatch.setitem(PRESETS, "mujoco", dataclasses.replace(PRESETS["mujoco"], values=values))
    with pytest.raises(ConfigError, match=f"preset 'mujoco' .*{message}"):
        check_preset_values(PRESETS["mujoco"])
    with pytest.raises(ConfigError, match=message):  # also when a run resolves it
        TrainConfig(env="Hopper-v5").resolved()


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ("HalfCheetah-v5", "HalfCheetah"),
        ("HalfCheetah", "HalfCheetah"),
        ("MinAtar/Breakout-v1", "MinAtar/Breakout"),
        ("my_package:Hopper-v4", "Hopper"),
        ("", None),
    ],
)
def test_env_key_drops_the_version(env, key):
    assert env_key(env) == key


@pytest.fixture
def mujoco_with_an_env_entry(monkeypatch):
    """``mujoco`` with family values and a HalfCheetah entry that overrides one of them."""
    preset = dataclasses.replace(
        PRESETS["mujoco"],
        values={"gamma": 0.98, "max_kl": 0.03},
        envs={"HalfCheetah": {"max_kl": 0.24, "num_envs": 2}},
    )
    monkeypatch.setitem(PRESETS, "mujoco", preset)
    return preset


def test_an_env_entry_wins_over_the_family_for_that_env_only(mujoco_with_an_env_entry):
    run = TrainConfig(env="HalfCheetah-v5", **{**SMALL, "num_envs": 8}).resolved()
    # num_envs=8 equals the default but was passed: the user's value wins over the entry
    assert (run.gamma, run.options.max_kl, run.num_envs) == (0.98, 0.24, 8)
    assert run.preset == "mujoco" and run.preset_values == {"gamma": 0.98, "max_kl": 0.24}
    run = TrainConfig(env="HalfCheetah-v4").resolved()  # any version
    assert (run.options.max_kl, run.num_envs) == (0.24, 2)
    assert run.preset_values == {"gamma": 0.98, "max_kl": 0.24, "num_envs": 2}
    run = TrainConfig(env="Hopper-v5").resolved()  # the rest of the family
    assert (run.gamma, run.options.max_kl, run.num_envs) == (0.98, 0.03, 8)
    assert run.preset_values == {"gamma": 0.98, "max_kl": 0.03}
    run = TrainConfig(env="Hopper-v5", preset="none").resolved()
    assert run.options.max_kl == 0.02 and run.preset_values == {}
    assert mujoco_with_an_env_entry.values == {"gamma": 0.98, "max_kl": 0.03}  # not mutated


@pytest.mark.parametrize(
    ("envs", "message"),
    [
        ({"CartPole": {"gamma": 0.9}}, "envs entry 'CartPole', which is not an environment "
                                       "of the 'mujoco' family"),
        ({"HalfCheetah-v5": {"gamma": 0.9}}, "envs entry 'HalfCheetah-v5'.*without its version"),
        ({"HalfCheetah": {"gama": 0.9}}, r"envs\['HalfCheetah'\] sets unknown option 'gama'"),
        ({"HalfCheetah": {"damping": -1.0}}, r"envs\['HalfCheetah'\]: damping must be > 0"),
    ],
)  # fmt: skip
def test_a_bad_env_entry_is_a_clear_error(monkeypatch, envs, message):
    monkeypatch.setitem(PRESETS, "mujoco", dataclasses.replace(PRESETS["mujoco"], envs=envs))
    with pytest.raises(ConfigError, match=f"preset 'mujoco' .*{message}"):
        check_preset_values(PRESETS["mujoco"])


def test_the_preset_fills_what_the_user_left_at_the_defaults(tuned_classic):
    config = TrainConfig(**SMALL)
    run = config.resolved()
    assert run.gamma == 0.97 and run.options.max_kl == 0.01
    assert run.preset == "classic" and run.preset_values == TUNED
    # the caller's object is not changed
    assert config.gamma == 0.99 and config.options.max_kl == 0.02
    assert config.preset == "auto" and config.preset_values is None
    assert run.hidden == (8,) and run.steps == 128  # what the user set stays


def test_values_passed_explicitly_win_over_the_preset(tuned_classic):
    # explicit keywords win even where they equal the defaults
    run = TrainConfig(gamma=0.99, options=RatNPGOptions(max_kl=0.02)).resolved()
    assert run.gamma == 0.99 and run.options.max_kl == 0.02 and run.preset_values == {}
    run = TrainConfig(gamma=0.99).resolved()
    assert run.gamma == 0.99 and run.options.max_kl == 0.01
    assert run.preset_values == {"max_kl": 0.01}
    # so do fields changed after construction
    config = TrainConfig()
    config.gamma = 0.9
    assert config.resolved().gamma == 0.9
    # and the deprecated flat option keywords, beside those of an options object
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        flat = TrainConfig(max_kl=0.02, options=RatNPGOptions(damping=0.2))
        mixed = TrainConfig(damping=0.2, options=RatNPGOptions(kl_guard=3.0))
    run = flat.resolved()
    assert run.options.max_kl == 0.02 and run.options.damping == 0.2 and run.gamma == 0.97
    run = mixed.resolved()
    assert (run.options.max_kl, run.options.damping, run.options.kl_guard) == (0.01, 0.2, 3.0)
    # keys given to from_dict (the CLI's flags) are explicit
    run = TrainConfig.from_dict({"max_kl": 0.02}).resolved()
    assert run.options.max_kl == 0.02 and run.gamma == 0.97


def test_dataclasses_replace_never_applies_half_a_preset(tuned_classic):
    """replace() passes every field: the preset used to reach the algorithm's options
    (max_kl, damping) but not the shared fields (gamma, the batch layout)."""
    base = TrainConfig(env="Pendulum-v1", preset="none")
    with pytest.warns(UserWarning, match="given every field .* preset sets none of them"):
        run = dataclasses.replace(base, preset="auto").resolved()
    assert run.gamma == 0.99 and run.options.max_kl == 0.02 and run.preset_values == {}
    # a resolved config replaced again keeps its values and warns about nothing
    resolved = TrainConfig(env="Pendulum-v1").resolved()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = dataclasses.replace(resolved, seed=1).resolved()
    assert (again.gamma, again.options.max_kl) == (resolved.gamma, resolved.options.max_kl)


def test_preset_none_forcing_a_family_and_unknown_envs(tuned_classic, monkeypatch):
    run = TrainConfig(preset="none").resolved()
    assert run.gamma == 0.99 and run.preset == "none" and run.preset_values == {}
    run = TrainConfig(env="LunarLander-v3").resolved()
    assert run.gamma == 0.99 and run.preset == "none" and run.preset_values == {}
    run = TrainConfig(env="Hopper-v5", preset="classic").resolved()
    assert run.gamma == 0.97 and run.preset == "classic"
    monkeypatch.setitem(PRESETS["mujoco"].values, "gamma", 0.995)
    assert TrainConfig(env="Hopper-v5").resolved().gamma == 0.995


def test_options_the_algorithm_does_not_read_are_skipped(tuned_classic):
    run = TrainConfig(algo="ppo", options=PPOOptions(ppo_epochs=4)).resolved()
    assert run.gamma == 0.97 and run.preset_values == {"gamma": 0.97}
    assert run.options == PPOOptions(ppo_epochs=4)


def test_an_unknown_preset_name_is_natgrads_error(capsys, tmp_path):
    with pytest.raises(ConfigError, match="--preset must be one of auto, none, classic, mujoco"):
        TrainConfig(preset="mujocco")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "mujocco", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "invalid choice: 'mujocco'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_cli_flag_lists_the_presets():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--preset {auto,none,classic,mujoco,minatar}" in text
    assert "default: auto" in " ".join(text.split())


def _config(run):
    return json.loads((run / "config.json").read_text())


@pytest.mark.parametrize(
    ("flags", "gamma", "max_kl", "preset", "applied"),
    [
        ([], 0.97, 0.01, "classic", TUNED),
        (["--gamma", "0.99"], 0.99, 0.01, "classic", {"max_kl": 0.01}),
        (["--preset", "none"], 0.99, 0.02, "none", {}),
    ],
)
def test_the_cli_records_the_preset_in_config_json(
    capsys, tmp_path, tuned_classic, flags, gamma, max_kl, preset, applied
):
    run = tmp_path / "run"
    assert main(["train", "--steps", "128", "--out", str(run), *TINY, *flags]) == 0
    saved = _config(run)
    assert saved["gamma"] == gamma and saved["options"]["max_kl"] == max_kl
    assert saved["preset"] == preset and saved["preset_values"] == applied
    printed = capsys.readouterr().err
    assert f'"preset": "{preset}"' in printed  # the printed configuration is the run's


def test_resume_reuses_the_recorded_preset_values(capsys, tmp_path, tuned_classic, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--steps", "128", "--out", str(run), *TINY]) == 0
    monkeypatch.setitem(PRESETS["classic"].values, "gamma", 0.5)  # the preset changed since
    monkeypatch.setitem(PRESETS["classic"].values, "max_kl", 0.03)
    assert main(["train", "--resume", "--out", str(run), "--steps", "256",
                 "--no-progress", "--no-tensorboard"]) == 0  # fmt: skip
    saved = _config(run)
    assert saved["steps"] == 256
    assert saved["gamma"] == 0.97 and saved["options"]["max_kl"] == 0.01
    assert saved["preset"] == "classic" and saved["preset_values"] == TUNED
    with pytest.warns(RuntimeWarning, match="re-seeded"):
        trainer = Trainer(None, run, resume=True, tensorboard=False)
    try:
        assert trainer.config.gamma == 0.97 and trainer.config.preset_values == TUNED
    finally:
        trainer.close()


def test_the_python_api_records_the_preset_and_a_saved_config_stays_resolved(
    tmp_path, tuned_classic, monkeypatch
):
    config = TrainConfig(**SMALL, options=RatNPGOptions(max_kl=0.02))
    trainer = Trainer(config, tmp_path / "run", tensorboard=False)
    trainer.close()
    assert config.preset_values is None and config.gamma == 0.99  # not mutated
    saved = _config(tmp_path / "run")
    assert saved["gamma"] == 0.97 and saved["options"]["max_kl"] == 0.02
    assert saved["preset_values"] == {"gamma": 0.97}
    loaded = TrainConfig.from_dict(saved)
    assert loaded.preset_values == {"gamma": 0.97} and loaded == trainer.config
    monkeypatch.setitem(PRESETS["classic"].values, "gamma", 0.5)
    again = loaded.resolved()  # already resolved: a copy, nothing re-applied
    assert again == loaded and again.preset_values == {"gamma": 0.97} and again is not loaded
