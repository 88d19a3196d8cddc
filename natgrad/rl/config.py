"""The options of one training run, printed and saved as ``config.json``.

:class:`TrainConfig` holds what the trainer reads (environment, rollouts, critic, fault
handling, checkpoints) and, in :attr:`TrainConfig.options`, the options dataclass of the
chosen algorithm (``RatNPGOptions``, ``PPOOptions``, ...; each declared next to its update
rule in ``natgrad/rl/algorithms/``). Every field carries its help text and check
(:func:`natgrad.rl.options.option`); the ``natgrad train`` flags are generated from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from dataclasses import dataclass
from typing import Any

from natgrad.errors import ArgumentTypeError
from natgrad.rl._errors import ConfigError
from natgrad.rl.algorithms import ALGORITHMS
from natgrad.rl.options import (
    AlgorithmOptions,
    RecordsGivenFields,
    at_least_one_or_off,
    check_fields,
    check_value,
    explicit_fields,
    flag,
    option,
    positive,
    unit_interval,
)
from natgrad.rl.presets import PRESETS, check_preset_values, preset_choices, preset_for_env

__all__ = ["TrainConfig", "algorithm_option_fields"]


def _known_algo(flag: str, value: Any) -> None:
    if value not in ALGORITHMS:
        raise ConfigError(
            f"unknown algorithm {flag} {value!r}; choose one of {', '.join(ALGORITHMS)}"
        )


def _widths(flag: str, value: Any) -> None:
    if not value or min(value) < 1:
        raise ConfigError(f"{flag} must be positive widths, got {value!r}")


def _seed(flag: str, value: Any) -> None:
    if value < 0:
        raise ConfigError(f"{flag} must be >= 0, got {value}")


def _threads(flag: str, value: Any) -> None:
    if value < 0:
        raise ConfigError(f"{flag} must be >= 1, or 0 to keep torch's current setting; got {value}")


@dataclass
class TrainConfig(RecordsGivenFields):
    """Options of one training run: the trainer's, and the chosen algorithm's in ``options``.

    Defaults train CartPole-v1 to 475 with ``rat-npg``. Each field is a ``natgrad train``
    flag (``num_envs`` is ``--num-envs``) whose help text is the field's ``help``
    metadata; so are the fields of every algorithm's options dataclass.

    Algorithm options given as flat keywords (``TrainConfig(algo="ppo", ppo_epochs=4)``,
    natgrad 0.1's spelling) still work, with a ``DeprecationWarning``; write
    ``TrainConfig(algo="ppo", options=PPOOptions(ppo_epochs=4))``. :meth:`from_dict`
    accepts both layouts without a warning, so old ``config.json`` files and checkpoints
    load.

    ``preset`` names hyperparameters per environment family (:mod:`natgrad.rl.presets`);
    :meth:`resolved` applies them under the values the user passed explicitly, and
    :class:`~natgrad.rl.Trainer` runs the resolved copy (its ``config.json`` records the
    preset and the values it applied, :attr:`preset_values`).
    """

    env: str = option(
        "CartPole-v1",
        "Gymnasium environment id, e.g. CartPole-v1, Pendulum-v1, Hopper-v5, MinAtar/Breakout-v1.",
    )
    algo: str = option("rat-npg", "Update rule, a key of natgrad.rl.ALGORITHMS.", _known_algo)
    steps: int = option(
        100_000,
        "Environment steps to train for, summed over parallel envs (rounded up to whole rollouts).",
        positive,
    )
    seed: int = option(0, "Seed of every random stream of the run.", _seed)
    num_envs: int = option(
        8, "Parallel environments; one update uses num_envs * num_steps samples.", positive
    )
    num_steps: int = option(256, "Steps per environment per rollout.", positive)
    gamma: float = option(0.99, "Discount factor.", unit_interval)
    gae_lambda: float = option(0.95, "GAE(lambda) parameter.", unit_interval)
    norm_obs: bool = option(
        True, "Whiten vector observations with running statistics (images are left as is)."
    )
    norm_reward: bool = option(True, "Divide rewards by the running std of the discounted return.")
    norm_adv: bool = option(
        True, "Whiten the advantages of each batch (mean 0, std 1); off: the raw GAE advantages."
    )
    hidden: tuple[int, ...] = option(
        (64, 64),
        "Hidden widths of the policy and critic MLPs (the CNN uses the last one).",
        _widths,
    )
    critic_lr: float = option(1e-3, "Adam learning rate of the critic regression.", positive)
    critic_epochs: int = option(10, "Passes of the critic regression over each batch.", positive)
    critic_minibatch: int = option(256, "Minibatch size of the critic regression.", positive)
    kl_reject: float = option(
        10.0,
        "Reject an update whose measured KL exceeds kl_reject times its KL target (algorithms "
        "with a max-kl; 0 disables); updates with non-finite results or solver errors are "
        "always rejected, with parameters and optimizer state restored.",
        at_least_one_or_off,
    )
    max_rejections: int = option(
        3, "Stop the run after this many consecutive rejected updates.", positive
    )
    checkpoint_every: int = option(
        10, "Save a checkpoint every this many updates (and always at the end).", positive
    )
    threads: int = option(
        1,
        "torch.set_num_threads while Trainer.run trains (0 leaves the current setting). One "
        "thread is fastest for small policies, whose tiny matmuls lose more to thread "
        "hand-offs than they gain.",
        _threads,
    )
    preset: str = option(
        "auto",
        "Hyperparameter preset (natgrad.rl.presets): auto picks the family of --env (classic, "
        "mujoco, minatar; none for other ids) and its entry for --env if it has one (mujoco: "
        "HalfCheetah, Walker2d), none keeps the defaults. Flags you pass win over the preset.",
        choices=preset_choices,
    )
    options: AlgorithmOptions | None = None
    """The chosen algorithm's options (``ALGORITHMS[algo].Options``); ``None``: its defaults."""

    def __post_init__(self) -> None:
        self._preset_values: dict[str, Any] | None = None
        self.validate()

    @property
    def preset_values(self) -> dict[str, Any] | None:
        """What :meth:`resolved` took from the preset, by option name (``None``: unresolved)."""
        return None if self._preset_values is None else dict(self._preset_values)

    def resolved(self) -> TrainConfig:
        """A copy with the preset applied under the values the user passed explicitly.

        Precedence, lowest first: the dataclass defaults, the preset's values (the
        family's, then its entry for this environment:
        :meth:`~natgrad.rl.presets.Preset.values_for`), the values the user set (keywords
        of ``TrainConfig(...)`` and of the options dataclass, keys given to
        :meth:`from_dict`, i.e. ``natgrad train`` flags, and any field whose value differs
        from its default). Preset values for options the chosen algorithm does not read
        are skipped. ``self`` is not changed.

        Returns
        -------
        TrainConfig
            ``preset`` is the concrete name applied (``"auto"`` becomes the family of
            ``env``, or ``"none"``) and :attr:`preset_values` what it set. A config that
            is already resolved (e.g. loaded from a run's ``config.json``) is copied
            unchanged, so a resumed run keeps its recorded values.

        Raises
        ------
        ConfigError
            The preset sets an unknown option or a value its option rejects.
        """
        if self._preset_values is not None:
            return _copy(self, {}, {}, self._preset_values)
        name = self.preset
        if name == "auto":
            name = preset_for_env(self.env) or "none"
        values: dict[str, Any] = {}
        if name != "none":
            check_preset_values(PRESETS[name])
            values = PRESETS[name].values_for(self.env)
        assert self.options is not None  # set by validate()
        mine, theirs = explicit_fields(self), explicit_fields(self.options)
        if mine >= {f.name for f in dataclasses.fields(self) if f.init}:
            # dataclasses.replace passes every field: all are the user's, the options too
            # (else the preset would reach the options but not the batch layout: half of it)
            theirs = frozenset(self.options.names())
            _warn_preset_unused(name, values, self)
        shared = {k: v for k, v in values.items() if k in _shared_names() and k not in mine}
        options = {k: v for k, v in values.items() if k in self.options.names() and k not in theirs}
        return _copy(self, {**shared, "preset": name}, options, {**shared, **options})

    @property
    def batch_size(self) -> int:
        """Samples per update, ``num_envs * num_steps``."""
        return self.num_envs * self.num_steps

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option and its allowed range."""
        _known_algo("--algo", self.algo)
        check_fields(self)
        if self.batch_size < 2:
            raise ConfigError(
                f"--num-envs {self.num_envs} x --num-steps {self.num_steps} gives "
                f"{self.batch_size} sample per update, but advantages are normalized by "
                "their standard deviation, which needs at least 2; raise --num-steps"
            )
        expected = ALGORITHMS[self.algo].Options
        if self.options is None:
            self.options = expected()
        elif type(self.options) is not expected:
            raise ConfigError(
                f"--algo {self.algo} takes options of type {expected.__name__}, got "
                f"{type(self.options).__name__}"
            )
        else:
            check_fields(self.options)

    def options_for(self, cls: type[AlgorithmOptions]) -> AlgorithmOptions:
        """The run's options if they are a ``cls``, else ``cls``'s defaults."""
        return self.options if isinstance(self.options, cls) else cls()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option (JSON-serializable); the algorithm's under ``options``."""
        out = {name: getattr(self, name) for name in _shared_names()}
        out["hidden"] = list(self.hidden)
        out["options"] = self.options.to_dict() if self.options is not None else {}
        applied = self._preset_values
        out["preset_values"] = None if applied is None else _plain(applied)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from :meth:`to_dict` output or from natgrad 0.1's flat layout.

        The flat layout (every option at the top level) is that of old ``config.json``
        files and checkpoints, and of the command line. Flat algorithm options are checked,
        and those the chosen algorithm does not read are dropped (they never had an
        effect). Unknown keys are an error. The keys given count as set by the user
        (:meth:`resolved` does not override them); ``preset_values`` (written by
        :meth:`to_dict` of a resolved config) marks the config as resolved.
        """
        shared = {k: v for k, v in data.items() if k in _shared_names()}
        applied = data.get("preset_values")
        flat = {
            k: v
            for k, v in data.items()
            if k not in shared and k not in ("options", "preset_values")
        }
        unknown = sorted(set(flat) - set(algorithm_option_fields()))
        if unknown:
            known = sorted(
                {*_shared_names(), "options", "preset_values", *algorithm_option_fields()}
            )
            raise ConfigError(f"unknown config keys {unknown}; known: {known}")
        algo = shared.get("algo", _DEFAULTS["algo"])
        _known_algo("--algo", algo)
        nested = data.get("options")
        if isinstance(nested, AlgorithmOptions):
            nested = nested.to_dict()
        options = _algorithm_options(algo, {**(nested or {}), **flat})
        config = cls(**shared, options=options)
        if applied is not None:
            config._preset_values = dict(applied)
        return config

    def to_json(self) -> str:
        """Pretty JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not attributes: natgrad 0.1's flat options.
        if name.startswith("_") or name == "options" or name not in algorithm_option_fields():
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(
            f"TrainConfig.{name} is deprecated; algorithm options live in "
            f"TrainConfig.options (config.options.{name})",
            DeprecationWarning,
            stacklevel=2,
        )
        options = self.__dict__.get("options")
        if options is not None and name in options.names():
            return getattr(options, name)
        return algorithm_option_fields()[name].default


def _warn_preset_unused(name: str, values: dict[str, Any], config: TrainConfig) -> None:
    """Warn when a config given every field (``dataclasses.replace``) skips its preset."""
    assert config.options is not None
    current = {**config.options.to_dict(), **{k: getattr(config, k) for k in _shared_names()}}
    differ = sorted(k for k, v in values.items() if k in current and current[k] != v)
    if differ:
        warnings.warn(
            f"this TrainConfig was given every field (as dataclasses.replace does), so the "
            f"{name!r} preset sets none of them ({', '.join(differ)} keep their values); "
            f"build TrainConfig(env={config.env!r}, ...) with only the fields you set to get "
            "the preset, or pass preset='none' to say you do not want it",
            UserWarning,
            stacklevel=3,
        )


def _copy(
    config: TrainConfig,
    changes: dict[str, Any],
    option_changes: dict[str, Any],
    applied: dict[str, Any],
) -> TrainConfig:
    """``config`` with ``changes`` and ``option_changes``, marked resolved with ``applied``."""
    assert config.options is not None
    options = dataclasses.replace(config.options, **option_changes)
    out = dataclasses.replace(config, **changes, options=options)
    out._preset_values = dict(applied)
    return out


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with tuples as lists, as JSON writes them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _shared_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "options")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def algorithm_option_fields() -> dict[str, dataclasses.Field]:
    """Every registered algorithm's option fields by name (first declaration wins).

    A name shared by several algorithms (``max_kl``, ``lr``) is one flag with one default.
    """
    out: dict[str, dataclasses.Field] = {}
    for algorithm in ALGORITHMS.values():
        for field in dataclasses.fields(algorithm.Options):
            out.setdefault(field.name, field)
    return out


def _algorithm_options(algo: str, values: dict[str, Any]) -> AlgorithmOptions:
    """``algo``'s options from flat ``values``.

    Values that only other algorithms read are checked (as natgrad 0.1 did) and dropped.
    """
    target = ALGORITHMS[algo].Options
    own = {k: v for k, v in values.items() if k in target.names()}
    for name, value in values.items():
        if name not in own:
            check_value(algorithm_option_fields()[name], value, flag(name))
    return target(**own)


def _accept_flat_options(init: Any) -> Any:
    """Let ``TrainConfig(...)`` take algorithm options as flat keywords (deprecated)."""

    @functools.wraps(init)
    def __init__(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k not in _DEFAULTS}
        if flat:
            unknown = sorted(set(flat) - set(algorithm_option_fields()))
            if unknown:
                raise ArgumentTypeError(f"TrainConfig got unexpected keyword arguments {unknown}")
            names = ", ".join(sorted(flat))
            warnings.warn(
                f"TrainConfig({names}=...) is deprecated: algorithm options live in "
                "TrainConfig.options; pass options=<Algorithm>Options(...) (e.g. "
                "natgrad.rl.algorithms.PPOOptions) or use TrainConfig.from_dict",
                DeprecationWarning,
                stacklevel=2,
            )
            algo = {**_DEFAULTS, **dict(zip(_DEFAULTS, args, strict=False)), **kwargs}["algo"]
            _known_algo("--algo", algo)
            given = kwargs.pop("options", None)
            base = {}
            if isinstance(given, AlgorithmOptions):  # only what the user set stays explicit
                base = {k: v for k, v in given.to_dict().items() if k in explicit_fields(given)}
            kwargs["options"] = _algorithm_options(algo, {**base, **flat})
        init(self, *args, **kwargs)

    return __init__


TrainConfig.__init__ = _accept_flat_options(TrainConfig.__init__)  # type: ignore[method-assign]

for _preset in PRESETS.values():  # a bad key in natgrad/rl/presets.py fails at import
    check_preset_values(_preset)
del _preset
