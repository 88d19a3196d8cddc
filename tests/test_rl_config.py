"""TrainConfig and the per-algorithm options: layout, old config.json, deprecated spellings."""

from __future__ import annotations

import ast
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from natgrad.cli import build_parser  # noqa: E402
from natgrad.rl import ALGORITHMS, ConfigError, TrainConfig  # noqa: E402
from natgrad.rl.algorithms import PPO, PPOOptions, RatNPGOptions, VanillaPG  # noqa: E402
from natgrad.rl.config import algorithm_option_fields  # noqa: E402

# natgrad 0.1's config.json: every algorithm's options at the top level.
OLD_FLAT = {
    "env": "CartPole-v1", "algo": "ppo", "steps": 512, "seed": 3, "num_envs": 2,
    "num_steps": 64, "gamma": 0.99, "gae_lambda": 0.95, "norm_obs": True,
    "norm_reward": True, "hidden": [8], "critic_lr": 0.001, "critic_epochs": 1,
    "critic_minibatch": 256, "max_kl": 0.02, "kl_guard": 2.0, "damping": 0.1,
    "solver": "auto", "block_size": 256, "rat_max_epochs": 20, "rat_tol": 0.001,
    "rat_preconditioner_rank": 256, "backtrack_iters": 10, "backtrack_coeff": 0.5,
    "cg_iters": 10, "cg_damping": 0.1, "lr": 0.001, "max_grad_norm": 0.5, "ent_coef": 0.0,
    "ppo_epochs": 4, "ppo_minibatch": 64, "clip_range": 0.2, "kfac_damping": 0.01,
    "kfac_decay": 0.95, "kfac_max_lr": 0.25, "kl_reject": 10.0, "max_rejections": 3,
    "checkpoint_every": 10, "threads": 1,
}  # fmt: skip


# Options added since natgrad 0.1 (an old config.json gets their defaults).
NEW_SINCE_FLAT = {"rat_fisher", "preset", "norm_adv", "rat_on_nonconvergence"}


def test_every_old_flag_is_an_option_exactly_once():
    shared = {f.name for f in dataclasses.fields(TrainConfig)} - {"options"}
    assert shared | set(algorithm_option_fields()) == set(OLD_FLAT) | NEW_SINCE_FLAT
    assert not shared & set(algorithm_option_fields())


def test_an_option_shared_by_algorithms_has_one_default_and_help():
    seen: dict[str, dataclasses.Field] = {}
    for algorithm in ALGORITHMS.values():
        for field in dataclasses.fields(algorithm.Options):
            assert field.metadata.get("help"), f"{algorithm.Options.__name__}.{field.name}"
            first = seen.setdefault(field.name, field)
            assert field.default == first.default, field.name


def test_the_trainer_config_keeps_only_shared_fields():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not names & {"max_kl", "damping", "lr", "ppo_epochs", "kfac_decay", "cg_iters"}
    config = TrainConfig(algo="ppo", options=PPOOptions(ppo_epochs=4))
    assert config.options == PPOOptions(ppo_epochs=4)
    assert isinstance(TrainConfig().options, RatNPGOptions)  # None: the algorithm's defaults


def test_old_flat_config_json_loads_without_warnings_and_round_trips():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = TrainConfig.from_dict(OLD_FLAT)
    assert config.options == PPOOptions(lr=0.001, ppo_epochs=4)
    assert config.hidden == (8,) and config.seed == 3
    data = json.loads(config.to_json())
    assert data["options"] == dataclasses.asdict(PPOOptions(lr=0.001, ppo_epochs=4))
    assert TrainConfig.from_dict(data) == config


def test_from_dict_checks_options_of_other_algorithms_and_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="--cg-damping must be >= 0, got -1"):
        TrainConfig.from_dict({"algo": "rat-npg", "cg_damping": -1})
    with pytest.raises(ConfigError, match=r"unknown config keys \['nope'\]"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ConfigError, match="takes options of type RatNPGOptions"):
        TrainConfig(options=PPOOptions())


def test_flat_keywords_and_attributes_are_deprecated_aliases():
    with pytest.warns(DeprecationWarning, match=r"TrainConfig\(ppo_epochs=...\) is deprecated"):
        config = TrainConfig(algo="ppo", ppo_epochs=4)
    assert config.options == PPOOptions(ppo_epochs=4)
    with pytest.warns(DeprecationWarning, match="config.options.ppo_epochs"):
        assert config.ppo_epochs == 4
    with pytest.warns(DeprecationWarning):
        assert config.max_kl == 0.02  # another algorithm's option: its default, as before
    with pytest.raises(AttributeError):
        config.no_such_option  # noqa: B018


def test_algorithms_still_accept_a_train_config_deprecated():
    policy = torch.nn.Linear(2, 2)
    config = TrainConfig.from_dict({"algo": "ppo", "lr": 0.01})
    with pytest.warns(DeprecationWarning, match=r"PPO\(policy, config, seed\)"):
        update = PPO(policy, config, 0)
    assert update.options.lr == 0.01
    with pytest.warns(DeprecationWarning):
        assert VanillaPG(policy, config, 0).options.lr == 0.01  # ppo's options extend vpg's
    with pytest.warns(DeprecationWarning, match=r"\.config is deprecated"):
        assert update.config is update.options


def test_old_helpers_are_deprecated_aliases_of_natgrad_distributions():
    from natgrad.rl import policies

    dist = torch.distributions.Normal(torch.zeros(3, 2), torch.ones(3, 2))
    acts = torch.zeros(3, 2)
    for name, args in [("log_prob", (dist, acts)), ("entropy", (dist,)),
                       ("sample_action", (dist, torch.Generator().manual_seed(0)))]:  # fmt: skip
        with pytest.warns(DeprecationWarning, match=f"policies.{name} is deprecated"):
            assert getattr(policies, name)(*args).shape[0] == 3


def test_cli_help_comes_from_the_field_metadata():
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    helps = {a.dest: a.help for a in train._actions}
    field = algorithm_option_fields()["ppo_epochs"]
    assert helps["ppo_epochs"].startswith(field.metadata["help"])
    assert "[ppo]" in helps["ppo_epochs"] and "(default: 10)" in helps["ppo_epochs"]
    assert "[rat-npg, rat-trpo, cg-trpo, kfac]" in helps["max_kl"]
    assert "[vpg, a2c, ppo]" in helps["lr"]


def test_algorithms_do_not_import_the_config_module():
    """No import cycle: config.py reads the algorithm table; the update rules know nothing of
    TrainConfig (nor of the trainer, the CLI or the policies module)."""
    import natgrad.rl.algorithms as package

    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in FORBIDDEN, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & FORBIDDEN, path.name


FORBIDDEN = {"natgrad.rl.config", "natgrad.rl.train", "natgrad.cli", "natgrad.rl.policies"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": "100"}, r"--steps \(TrainConfig.steps\) must be an integer, got '100'"),
        ({"steps": True}, "--steps .* must be an integer, got True of type bool"),
        ({"steps": 700.5}, "--steps .* must be an integer, got 700.5"),
        ({"num_envs": 2.0}, "--num-envs .* must be an integer, got 2.0"),
        ({"num_steps": 64.7}, "--num-steps .* must be an integer"),
        ({"seed": 1.5}, "--seed .* must be an integer"),
        ({"seed": "0"}, "--seed .* must be an integer"),
        ({"threads": 2.5}, "--threads .* must be an integer"),
        ({"checkpoint_every": 1.5}, "--checkpoint-every .* must be an integer"),
        ({"critic_epochs": 2.5}, "--critic-epochs .* must be an integer"),
        ({"critic_minibatch": 100.5}, "--critic-minibatch .* must be an integer"),
        ({"gamma": "0.9"}, r"--gamma \(TrainConfig.gamma\) must be a real number, got '0.9'"),
        ({"gamma": None}, "--gamma .* must be a real number, got None"),
        ({"critic_lr": False}, "--critic-lr .* must be a real number, got False"),
        ({"norm_obs": "no"}, r"--norm-obs .* must be True or False, got 'no' of type str"),
        ({"norm_reward": 0}, "--norm-reward .* must be True or False, got 0"),
        ({"env": 123}, r"--env \(TrainConfig.env\) must be a string, got 123"),
        ({"env": None}, "--env .* must be a string, got None"),
        ({"hidden": "64"}, r"--hidden .* must be a tuple of integers, got '64'"),
        ({"hidden": 64}, "--hidden .* must be a tuple of integers, got 64"),
        ({"hidden": (64.9,)}, "--hidden .* must be a tuple of integers, got \\(64.9,\\)"),
        ({"hidden": (True,)}, "--hidden .* must be a tuple of integers"),
    ],
)
def test_a_wrongly_typed_option_is_refused_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)
    with pytest.raises(ConfigError, match=message):  # config.json / the CLI's path
        TrainConfig.from_dict(kwargs)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RatNPGOptions(max_kl="0.1"), r"--max-kl \(RatNPGOptions.max_kl\) must be a real"),
        (lambda: RatNPGOptions(block_size=2.5), "--block-size .* must be an integer"),
        (lambda: PPOOptions(ppo_epochs=1.5), r"--ppo-epochs \(PPOOptions.ppo_epochs\) must be an"),
        (lambda: PPOOptions(ppo_minibatch=50.5), "--ppo-minibatch .* must be an integer"),
        (lambda: RatNPGOptions(solver=1), "--solver .* must be a string"),
        # an option of another algorithm, checked and dropped by from_dict
        (lambda: TrainConfig.from_dict({"algo": "ppo", "max_kl": "0.1"}), "--max-kl must be a"),
    ],
)
def test_a_wrongly_typed_algorithm_option_is_refused_naming_it(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_numpy_scalars_and_json_lists_are_stored_as_plain_python():
    config = TrainConfig(
        steps=np.int64(512), gamma=np.float32(0.5), norm_obs=np.bool_(False),
        hidden=[np.int64(8), 4], critic_lr=1, options=RatNPGOptions(block_size=np.int32(64)),
    )  # fmt: skip
    assert config.hidden == (8, 4) and type(config.steps) is int and config.norm_obs is False
    assert type(config.gamma) is float and config.gamma == 0.5 and type(config.critic_lr) is float
    assert type(config.options.block_size) is int
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config


def test_every_option_annotation_has_a_type_check():
    from natgrad.rl.options import _TYPES

    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "options"]
    for field in [*fields, *algorithm_option_fields().values()]:
        assert field.type in _TYPES, field.name
        what, accepts, _ = _TYPES[field.type]
        assert accepts(field.default), (field.name, what)  # the defaults pass their own check
