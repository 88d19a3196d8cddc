"""Evaluate a saved policy: returns over fresh episodes, optionally a GIF of the first one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from natgrad.distributions import mode, sample
from natgrad.rl._errors import CheckpointError, ConfigError, MissingExtraError
from natgrad.rl.checkpoint import (
    CHECKPOINT_NAME,
    POLICY_NAME,
    checkpoint_content,
    load_checkpoint,
    load_policy,
    writable_file,
    write_output,
)
from natgrad.rl.config import TrainConfig
from natgrad.rl.envs import env_actions, make_env
from natgrad.rl.normalize import ObsNormalizer
from natgrad.rl.policies import build_actor_critic
from natgrad.rl.rollout import check_env_output

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Returns and lengths of evaluation episodes.

    Attributes
    ----------
    returns, lengths
        One entry per episode.
    step
        Training step of the evaluated checkpoint.
    """

    returns: tuple[float, ...]
    lengths: tuple[int, ...]
    step: int

    @property
    def mean(self) -> float:
        """Mean return."""
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        """Standard deviation of the returns."""
        return float(np.std(self.returns))


def _require_finite(path: Path, tensors: dict[str, Any]) -> None:
    """Refuse ``path`` if a saved tensor (by its name in the file) holds NaN or inf."""
    for name, value in tensors.items():
        value = torch.as_tensor(value)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"{path}: the saved tensor {name!r} holds {bad} NaN or inf value(s) of "
                f"{value.numel()}, so the policy's actions and returns would be meaningless; "
                "the file is damaged or was saved from a diverged policy: evaluate another "
                "checkpoint or run"
            )


def _load_run(run: Path) -> tuple[TrainConfig, dict[str, Any], dict[str, Any], int]:
    """``(config, policy state, obs-normalizer state, step)`` of a run, loaded safely.

    ``policy.safetensors`` is preferred; ``checkpoint.pt`` (``weights_only``) otherwise.
    Every policy tensor and the observation statistics must be finite.
    """
    if run.is_file() and run.suffix not in (".safetensors", ".pt"):
        raise ConfigError(
            f"{str(run)!r} is a file, not a run: pass the run's directory "
            f"({str(run.parent)!r}), its {POLICY_NAME} or its {CHECKPOINT_NAME}"
        )
    policy_file = run if run.suffix == ".safetensors" else run / POLICY_NAME
    if not policy_file.exists():
        path = run if run.suffix == ".pt" else run / CHECKPOINT_NAME
        state = load_checkpoint(path)
        with checkpoint_content(path):
            config = TrainConfig.from_dict(state["config"])
            step = int(state["global_step"])
            policy, obs_norm = state["policy"], state["collector"]["obs_norm"]
            rms = obs_norm["rms"]
            _require_finite(path, {f"policy.{k}": v for k, v in policy.items()})
            _require_finite(path, {f"collector.obs_norm.rms.{k}": rms[k] for k in ("mean", "var")})
            return config, policy, obs_norm, step
    tensors, meta = load_policy(policy_file)
    try:
        config = TrainConfig.from_dict(json.loads(meta["config"]))
        norm = json.loads(meta["obs_norm"])
        obs_norm = {
            "enabled": norm["enabled"],
            "clip": norm["clip"],
            "rms": {
                "mean": tensors.pop("obs_norm.mean"),
                "var": tensors.pop("obs_norm.var"),
                "count": norm["count"],
            },
        }
        step = int(meta["global_step"])
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{policy_file} lacks natgrad's metadata ({type(error).__name__}: {error}); "
            "evaluate a policy.safetensors written by `natgrad train`"
        ) from None
    _require_finite(policy_file, tensors)
    _require_finite(policy_file, {f"obs_norm.{k}": obs_norm["rms"][k] for k in ("mean", "var")})
    policy = {k.removeprefix("policy."): v for k, v in tensors.items()}
    return config, policy, obs_norm, step


@torch.no_grad()
def evaluate(
    run_dir: str | Path,
    episodes: int = 10,
    seed: int = 10_000,
    deterministic: bool = True,
    gif: str | Path | None = None,
) -> EvalResult:
    """Run a saved policy for ``episodes`` episodes with frozen observation statistics.

    Parameters
    ----------
    run_dir
        Output directory of ``natgrad train`` (its ``policy.safetensors``, or its
        ``checkpoint.pt`` if there is none), or a ``.safetensors`` or ``.pt`` file written
        by it. Nothing is unpickled: loading runs no code from the files.
    episodes
        Number of episodes.
    seed
        Environment seed of the first episode (episode ``k`` uses ``seed + k``); the
        default differs from training seeds.
    deterministic
        Take the most likely action (mean / argmax) instead of sampling.
    gif
        If given, write the first episode as an animated GIF here (needs Pillow, which
        matplotlib installs).
    """
    if episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {episodes}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if gif is not None:
        gif = writable_file(gif, "--gif")
    config, policy_state, norm_state, step = _load_run(Path(run_dir))
    env = make_env(config.env, **({"render_mode": "rgb_array"} if gif else {}))
    policy, _ = build_actor_critic(
        env.observation_space, env.action_space, config.hidden, torch.Generator()
    )
    obs_shape = tuple(env.observation_space.shape)
    norm = ObsNormalizer(obs_shape)
    try:
        policy.load_state_dict(policy_state)
        norm.load_state_dict(norm_state)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        env.close()
        raise CheckpointError(
            f"the saved policy in {str(run_dir)!r} does not fit {config.env} with --hidden "
            f"{' '.join(map(str, config.hidden))} ({type(error).__name__}); it was not "
            "written by this run"
        ) from None
    generator = torch.Generator().manual_seed(seed)
    returns, lengths, frames = [], [], []
    for k in range(episodes):
        raw, _ = env.reset(seed=seed + k)
        check_env_output(raw, None, "reset")
        total, length, done = 0.0, 0, False
        while not done:
            if gif and k == 0:
                frames.append(_render(env, config.env))
            dist = policy(torch.as_tensor(norm(raw[None], update=False)))
            act = (mode(dist) if deterministic else sample(dist, generator))[0].numpy()
            act = env_actions(env.action_space, act)
            raw, reward, terminated, truncated, _ = env.step(act)
            check_env_output(raw, reward, "step")
            total += float(reward)
            length += 1
            done = terminated or truncated
        returns.append(total)
        lengths.append(length)
    env.close()
    if gif:
        _write_gif(Path(gif), frames)
    return EvalResult(tuple(returns), tuple(lengths), step)


def _render(env: Any, env_id: str) -> Any:
    import gymnasium

    try:
        return env.render()
    except gymnasium.error.DependencyNotInstalled as error:
        raise ConfigError(f"--gif: rendering {env_id} needs a missing package: {error}") from error
    except Exception as error:  # e.g. no OpenGL context on a headless machine
        raise ConfigError(
            f"--gif: rendering {env_id} failed ({type(error).__name__}: {error}); "
            "run without --gif or on a machine with a display/OpenGL"
        ) from error


def _write_gif(path: Path, frames: list) -> None:
    try:
        from PIL import Image
    except ImportError as error:
        raise MissingExtraError("--gif", "rl", "pillow") from error
    images = [Image.fromarray(np.asarray(f)) for f in frames if f is not None]
    if not images:
        raise ConfigError("the environment rendered no frames; --gif needs render_mode rgb_array")
    write_output(
        path,
        lambda handle: images[0].save(
            handle, format="GIF", save_all=True, append_images=images[1:], duration=33, loop=0
        ),
        "--gif",
    )
