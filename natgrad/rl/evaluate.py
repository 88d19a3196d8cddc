"""Evaluate a saved policy: returns over fresh episodes, optionally a GIF of the first one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributions import Categorical, Normal

from natgrad.rl._errors import ConfigError, MissingExtraError
from natgrad.rl.checkpoint import CHECKPOINT_NAME, load_checkpoint
from natgrad.rl.config import TrainConfig
from natgrad.rl.envs import make_env
from natgrad.rl.normalize import ObsNormalizer
from natgrad.rl.policies import build_actor_critic, sample_action

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


def _mode(dist: torch.distributions.Distribution) -> torch.Tensor:
    if isinstance(dist, Categorical):
        return dist.probs.argmax(-1)
    if isinstance(dist, Normal):
        return dist.loc
    raise TypeError(f"no deterministic action for {type(dist).__name__}")


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
        Output directory of ``natgrad train`` (its ``checkpoint.pt`` is loaded).
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
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        raise ConfigError(
            f"{str(run_dir)!r} has no {CHECKPOINT_NAME}; pass the --out directory of a "
            "`natgrad train` run"
        )
    if episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {episodes}")
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    env = make_env(config.env, **({"render_mode": "rgb_array"} if gif else {}))
    policy, _ = build_actor_critic(
        env.observation_space, env.action_space, config.hidden, torch.Generator()
    )
    policy.load_state_dict(state["policy"])
    obs_shape = tuple(env.observation_space.shape)
    norm = ObsNormalizer(obs_shape)
    norm.load_state_dict(state["collector"]["obs_norm"])
    generator = torch.Generator().manual_seed(seed)
    box = hasattr(env.action_space, "low")
    returns, lengths, frames = [], [], []
    for k in range(episodes):
        raw, _ = env.reset(seed=seed + k)
        total, length, done = 0.0, 0, False
        while not done:
            if gif and k == 0:
                frames.append(_render(env, config.env))
            dist = policy(torch.as_tensor(norm(raw[None], update=False)))
            act = (_mode(dist) if deterministic else sample_action(dist, generator))[0].numpy()
            if box:
                act = np.clip(act, env.action_space.low, env.action_space.high)
            raw, reward, terminated, truncated, _ = env.step(act)
            total += float(reward)
            length += 1
            done = terminated or truncated
        returns.append(total)
        lengths.append(length)
    env.close()
    if gif:
        _write_gif(Path(gif), frames)
    return EvalResult(tuple(returns), tuple(lengths), int(state["global_step"]))


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
    images[0].save(path, save_all=True, append_images=images[1:], duration=33, loop=0)
