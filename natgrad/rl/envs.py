"""Gymnasium vector environments: creation with clear errors, seeding, and state capture."""

from __future__ import annotations

import difflib
import importlib
import pickle
from typing import Any

import numpy as np

from natgrad.rl._errors import ConfigError, MissingExtraError, first_line, import_gymnasium

__all__ = [
    "env_actions",
    "env_state",
    "is_discrete",
    "make_env",
    "make_vec_env",
    "restore_env_state",
]

# Entry-point prefixes of environments that live behind an optional extra.
_MUJOCO_ENTRY = "gymnasium.envs.mujoco"


def is_discrete(action_space: Any) -> bool:
    """Whether actions are one integer (``Discrete``); otherwise a ``Box`` of floats."""
    from gymnasium import spaces

    return isinstance(action_space, spaces.Discrete)


def env_actions(action_space: Any, acts: np.ndarray) -> np.ndarray:
    """The policy's actions ``acts`` as the environment takes them.

    A categorical policy samples indices ``0..n-1``; ``Discrete(n, start=s)`` takes
    ``s + index``. Gaussian samples are clipped to the ``Box`` bounds. Rollouts store (and
    score) the policy's own actions, not these.
    """
    if is_discrete(action_space):
        return acts + action_space.start if action_space.start != 0 else acts
    return np.clip(acts, action_space.low, action_space.high)


def _ensure_registered(env_id: str) -> None:
    """Import the package that registers ``env_id`` (MinAtar registers on import)."""
    if env_id.startswith("MinAtar/"):
        try:
            from minatar.gym import register_envs
        except ImportError as error:
            raise MissingExtraError(f"environment {env_id!r}", "minatar") from error
        gym = import_gymnasium()
        if "MinAtar/Breakout-v1" not in gym.registry:
            register_envs()


def _unknown_env(env_id: str) -> ConfigError:
    gym = import_gymnasium()
    known = sorted(gym.registry.keys())
    close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return ConfigError(
        f"unknown environment --env {env_id!r}{hint} Any Gymnasium id works, e.g. CartPole-v1, "
        "Pendulum-v1, Hopper-v5 (natgrad[mujoco]) or MinAtar/Breakout-v1 (natgrad[minatar])"
    )


def make_env(env_id: str, **kwargs: Any) -> Any:
    """Create one Gymnasium environment, translating failures into actionable errors.

    Parameters
    ----------
    env_id
        A registered Gymnasium id, e.g. ``"CartPole-v1"``.
    **kwargs
        Passed to ``gymnasium.make``.

    Raises
    ------
    ConfigError
        The id is not registered.
    MissingExtraError
        The environment needs an optional dependency (MuJoCo, MinAtar).
    """
    gym = import_gymnasium()
    _ensure_registered(env_id)
    registered = _import_registering_module(env_id)
    if registered not in gym.registry:
        raise _unknown_env(env_id)
    entry = str(gym.registry[registered].entry_point)
    try:
        return gym.make(env_id, **kwargs)
    except (gym.error.DependencyNotInstalled, ImportError) as error:
        if entry.startswith(_MUJOCO_ENTRY):
            raise MissingExtraError(f"environment {env_id!r}", "mujoco") from error
        # not one of natgrad's extras (Box2D, ...): gymnasium's message says what to install
        raise ConfigError(
            f"environment --env {env_id!r} needs a package that is not installed "
            f"({first_line(error)}); install it, or pick another --env"
        ) from error


def _import_registering_module(env_id: str) -> str:
    """For ``"module:Env-v0"`` (gymnasium's form), import ``module``; return the id itself.

    Raises
    ------
    ConfigError
        The module cannot be imported.
    """
    module, sep, registered = env_id.partition(":")
    if not sep:
        return env_id
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"--env {env_id!r} names the module {module!r} to import before making "
            f"{registered!r}, but importing it failed ({first_line(error)}); check the "
            "module path (it must be importable from this Python)"
        ) from error
    return registered


def make_vec_env(env_id: str, num_envs: int) -> Any:
    """Create a ``SyncVectorEnv`` of ``num_envs`` copies that resets within the same step.

    Same-step autoreset returns the first observation of the next episode together with
    the final observation of the finished one (``infos["final_obs"]``), which is what
    bootstrapping truncated episodes needs. Seed it with ``reset(seed=...)``.
    """
    if num_envs < 1:
        raise ConfigError(f"num_envs must be >= 1, got {num_envs}")
    gym = import_gymnasium()
    make_env(env_id).close()  # fail early, with our error messages, in this process
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    return SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(num_envs)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )


# MjData fields that, with the model, determine the next mj_step exactly.
_MJ_FIELDS = (
    "qpos", "qvel", "act", "ctrl", "qacc_warmstart", "qfrc_applied", "xfrc_applied",
    "mocap_pos", "mocap_quat", "userdata", "plugin_state",
)  # fmt: skip


def _extra_state(env: Any) -> dict[str, Any]:
    """State that pickling may not carry: the env's RNG and MuJoCo's simulator data.

    Environments pickled through ``EzPickle`` (MuJoCo, Box2D) are rebuilt from their
    constructor arguments on unpickling, which resets both.
    """
    base = env.unwrapped
    state: dict[str, Any] = {}
    rng = getattr(base, "_np_random", None)
    if rng is not None:
        state["rng"] = rng  # pickled with the envs: a copy of generator and state
    data = getattr(base, "data", None)
    if data is not None and hasattr(data, "qpos") and hasattr(data, "qacc_warmstart"):
        state["mujoco"] = {f: np.copy(getattr(data, f)) for f in _MJ_FIELDS if hasattr(data, f)}
        state["mujoco_time"] = float(data.time)
    return state


def _apply_extra_state(env: Any, state: dict[str, Any]) -> None:
    base = env.unwrapped
    if "rng" in state:
        base._np_random = state["rng"]
    if "mujoco" in state:
        import mujoco

        data = base.data
        for field, value in state["mujoco"].items():
            getattr(data, field)[...] = value
        data.time = state["mujoco_time"]
        warmstart = np.copy(data.qacc_warmstart)
        mujoco.mj_forward(base.model, data)  # derived quantities, for rendering
        data.qacc_warmstart[...] = warmstart


def env_state(vec_env: Any) -> bytes | None:
    """Pickle the sub-environments (physics state, RNG, time-limit counters), if possible.

    Returns ``None`` when an environment cannot be pickled; a resumed run then restarts
    its episodes from a fresh reset.
    """
    try:
        return pickle.dumps(
            {"envs": vec_env.envs, "extra": [_extra_state(env) for env in vec_env.envs]}
        )
    except Exception:  # any unpicklable member (e.g. native handles): not capturable
        return None


def restore_env_state(vec_env: Any, state: bytes) -> None:
    """Replace the sub-environments of ``vec_env`` by those captured in ``state``.

    Unpickling runs code from ``state``: the trainer calls this only when the user trusts
    the run directory (``--trust-env-state``).
    """
    saved = pickle.loads(state)  # noqa: S301 - opt-in, see the docstring
    for old in vec_env.envs:
        old.close()
    vec_env.envs = saved["envs"]
    for env, extra in zip(vec_env.envs, saved["extra"], strict=True):
        _apply_extra_state(env, extra)
