"""Hyperparameter presets per environment family, chosen by environment id.

A preset overrides some :class:`~natgrad.rl.TrainConfig` fields and algorithm options
for one family of environments (``classic``, ``mujoco``, ``minatar``). ``natgrad train
--preset auto`` (the default) picks the family of ``--env`` with :func:`preset_for_env`;
values the user passed explicitly always win over the preset's, and the preset's over the
dataclass defaults. The resolved name and the values it applied are saved in the run's
``config.json`` (see :meth:`natgrad.rl.TrainConfig.resolved`).

Each preset's overrides are one plain dict literal below, for the whole family, and
optionally one more per environment (``envs``, keyed by the id without its version, as
rl-baselines3-zoo tunes per environment); an environment's entry wins over the family's
values. Every key is checked against the real option fields when :mod:`natgrad.rl.config`
is imported (:func:`check_preset_values`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from natgrad.rl._errors import ConfigError
from natgrad.rl.options import check_value

__all__ = [
    "PRESETS",
    "PRESET_CHOICES",
    "Preset",
    "check_preset_values",
    "env_key",
    "preset_choices",
    "preset_for_env",
]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Hyperparameters of one environment family.

    Parameters
    ----------
    name
        Registry key, the value of ``--preset``.
    description
        One line: which environments the preset is for.
    source
        Where its values come from (a tuning study, a paper, "not tuned yet").
    values
        The :class:`~natgrad.rl.TrainConfig` fields and algorithm options it overrides, by
        field name (``{"gamma": 0.995, "max_kl": 0.01}``); empty: the defaults.
    envs
        Further overrides for single environments of the family, keyed by the id without
        its version (``{"HalfCheetah": {"damping": 0.6}}``, ``"MinAtar/Breakout"``); they
        win over ``values``.
    """

    name: str
    description: str
    source: str
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    envs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def values_for(self, env_id: str) -> dict[str, Any]:
        """The overrides for ``env_id``: the family's values, then the environment's entry.

        Parameters
        ----------
        env_id
            A Gymnasium id (any version), e.g. ``"HalfCheetah-v5"``.

        Returns
        -------
        dict
            A new dict; the preset is not changed.
        """
        return {**self.values, **self.envs.get(env_key(env_id) or "", {})}


# sb3-contrib TRPO's rl-zoo batch layout and critic fitting on MuJoCo (2 x 1,024 steps,
# 20 critic passes over minibatches of 128), shared by the mujoco entries.
_PEER_LAYOUT = {"num_envs": 2, "num_steps": 1024, "critic_epochs": 20, "critic_minibatch": 128}

PRESETS: dict[str, Preset] = {
    "classic": Preset(
        "classic",
        "Gymnasium classic control: CartPole, Acrobot, MountainCar, Pendulum.",
        "the defaults, tuned on CartPole",
        {},
    ),
    "mujoco": Preset(
        "mujoco",
        "Gymnasium MuJoCo locomotion and manipulation: Hopper, Walker2d, HalfCheetah, Ant, ...",
        "benchmarks/rl/results/tune/mujoco-3env.md: the defaults. Two searches found no "
        "setting that holds up: the first (mujoco.md) nothing better on tuning seeds, the "
        "second's best (damping 1.0, 2 x 1,024) lost to the defaults on evaluation seeds. "
        "HalfCheetah and Walker2d: sb3-contrib TRPO's rl-zoo setting in natgrad's units "
        "(its damping, batch layout and critic fitting; half its trust region), chosen on "
        "tuning seeds in benchmarks/rl/results_damping_tuning; evaluated in "
        "results_protocol_300k_entry, results_protocol_300k_fresh and "
        "results_protocol_300k_walker2d_entry",
        {},
        {
            "HalfCheetah": {**_PEER_LAYOUT, "max_kl": 0.12, "damping": 0.6},
            "Walker2d": {**_PEER_LAYOUT, "max_kl": 0.03, "damping": 0.6},
        },
    ),
    "minatar": Preset(
        "minatar",
        "MinAtar games (MinAtar/Breakout-v1, ...), CNN policies.",
        "not tuned yet",
        {},
    ),
}
"""Presets by name; ``--preset`` takes one of these, ``auto`` or ``none``."""

PRESET_CHOICES = ("auto", "none")
"""The values of ``--preset`` besides the registry names."""

_NOT_PRESETTABLE = frozenset({"env", "algo", "seed", "preset"})
"""Fields a preset must not set: they choose the run, not its hyperparameters."""

_CLASSIC = frozenset({"CartPole", "Acrobot", "MountainCar", "MountainCarContinuous", "Pendulum"})
_MUJOCO = frozenset({
    "Ant", "HalfCheetah", "Hopper", "Humanoid", "HumanoidStandup", "InvertedDoublePendulum",
    "InvertedPendulum", "Pusher", "Reacher", "Swimmer", "Walker2d",
})  # fmt: skip
_ID = re.compile(r"^(?:(?P<namespace>[\w:.-]+)/)?(?P<name>[\w:.-]+?)(?:-v(?P<version>\d+))?$")


def preset_choices() -> tuple[str, ...]:
    """Every valid ``--preset`` value: ``auto``, ``none`` and the registry names."""
    return (*PRESET_CHOICES, *PRESETS)


def env_key(env_id: str) -> str | None:
    """The id of ``env_id`` without its version or ``module:`` prefix (``None``: not an id).

    ``"HalfCheetah-v5"`` -> ``"HalfCheetah"``, ``"MinAtar/Breakout-v1"`` ->
    ``"MinAtar/Breakout"``: the keys of :attr:`Preset.envs`.
    """
    match = _ID.match(env_id.rsplit(":", 1)[-1])
    if match is None:
        return None
    namespace, name = match["namespace"], match["name"]
    return name if namespace is None else f"{namespace}/{name}"


def preset_for_env(env_id: str) -> str | None:
    """The preset family of a Gymnasium environment id, or ``None`` for unknown ids.

    Parameters
    ----------
    env_id
        A Gymnasium id such as ``"CartPole-v1"``, ``"Hopper-v5"`` or
        ``"MinAtar/Breakout-v1"`` (any version; a ``module:`` prefix is ignored).

    Returns
    -------
    str or None
        ``"classic"``, ``"mujoco"``, ``"minatar"``, or ``None``: no preset applies.
    """
    key = env_key(env_id)
    if key is None:
        return None
    namespace, _, name = key.rpartition("/")
    if namespace == "MinAtar":
        return "minatar"
    if namespace:
        return None
    if name in _CLASSIC:
        return "classic"
    if name in _MUJOCO:
        return "mujoco"
    return None


def check_preset_values(preset: Preset) -> None:
    """Check that every key of ``preset.values`` is an option and its value passes its check.

    Parameters
    ----------
    preset
        The preset to check.

    Raises
    ------
    ConfigError
        A key that is no :class:`~natgrad.rl.TrainConfig` field nor algorithm option (the
        message lists the known names), a key that chooses the run (``env``, ``algo``,
        ``seed``, ``preset``), a value its option rejects, or an ``envs`` entry for an
        environment outside the family.
    """
    where = f"preset {preset.name!r} (natgrad/rl/presets.py)"
    _check_values(where, preset.values)
    for key, values in preset.envs.items():
        if env_key(key) != key or preset_for_env(key) != preset.name:
            raise ConfigError(
                f"{where} has an envs entry {key!r}, which is not an environment of the "
                f"{preset.name!r} family written without its version (e.g. "
                f"{_EXAMPLE_KEYS.get(preset.name, 'Hopper')!r}); fix or remove the entry"
            )
        _check_values(f"{where}, envs[{key!r}]", values)


_EXAMPLE_KEYS = {"classic": "CartPole", "mujoco": "HalfCheetah", "minatar": "MinAtar/Breakout"}


def _check_values(where: str, values: Mapping[str, Any]) -> None:
    from natgrad.rl.config import TrainConfig, algorithm_option_fields

    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "options"}
    fields.update(algorithm_option_fields())
    for name, value in values.items():
        if name in _NOT_PRESETTABLE:
            raise ConfigError(
                f"{where} sets {name!r}, which chooses the run rather than tunes it; "
                "remove it from the preset's values"
            )
        if name not in fields:
            known = ", ".join(sorted(set(fields) - _NOT_PRESETTABLE))
            raise ConfigError(f"{where} sets unknown option {name!r}; known: {known}")
        check_value(fields[name], value, f"{where}: {name}")
