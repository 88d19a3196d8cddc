"""Policies (diagonal Gaussian, categorical) and critics with MLP or MinAtar-CNN torsos.

Every module is initialized from an explicit ``torch.Generator`` (orthogonal init, as in
PPO implementations), so the same seed gives the same network without the global RNG.
Distributions are built with ``validate_args=False``: argument validation is
data-dependent control flow, which ``torch.func.vmap`` (used by RAT) cannot trace.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal

from natgrad import distributions
from natgrad.rl._errors import ConfigError
from natgrad.rl.envs import is_discrete

__all__ = [
    "CategoricalPolicy",
    "GaussianPolicy",
    "MLPTorso",
    "MinAtarTorso",
    "ValueFunction",
    "build_actor_critic",
    "sample_action",
]


class MLPTorso(nn.Module):
    """``Linear -> tanh`` stack on flattened observations.

    Parameters
    ----------
    in_dim
        Flattened observation size.
    hidden
        Width of each hidden layer.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.Tanh()]
            in_dim = width
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, obs: Tensor) -> Tensor:
        """Map observations ``(N, *obs_shape)`` to features ``(N, out_dim)``."""
        return self.net(obs.flatten(1))


class MinAtarTorso(nn.Module):
    """The MinAtar baseline network: ``Conv(C->16, 3x3) -> ReLU -> Linear(->hidden) -> ReLU``.

    Parameters
    ----------
    obs_shape
        ``(H, W, C)``, channels last as MinAtar returns them (e.g. ``(10, 10, 4)``).
    hidden
        Width of the fully connected layer.
    channels
        Number of convolution filters.
    """

    def __init__(self, obs_shape: tuple[int, int, int], hidden: int = 128, channels: int = 16):
        super().__init__()
        height, width, in_channels = obs_shape
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3, stride=1)
        self.fc = nn.Linear(channels * (height - 2) * (width - 2), hidden)
        self.out_dim = hidden

    def forward(self, obs: Tensor) -> Tensor:
        """Map images ``(N, H, W, C)`` to features ``(N, hidden)``."""
        x = torch.relu(self.conv(obs.permute(0, 3, 1, 2)))
        return torch.relu(self.fc(x.flatten(1)))


def _torso(obs_shape: tuple[int, ...], hidden: tuple[int, ...]) -> nn.Module:
    if len(obs_shape) == 3:
        return MinAtarTorso(obs_shape, hidden=hidden[-1] if hidden else 128)  # type: ignore[arg-type]
    return MLPTorso(math.prod(obs_shape), hidden)


class CategoricalPolicy(nn.Module):
    """Policy over ``n`` discrete actions: ``Categorical(logits=head(torso(obs)))``."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, hidden: tuple[int, ...]):
        super().__init__()
        self.torso = _torso(obs_shape, hidden)
        self.head = nn.Linear(self.torso.out_dim, num_actions)

    def forward(self, obs: Tensor) -> Distribution:
        """Return the action distribution for a batch of observations."""
        return Categorical(logits=self.head(self.torso(obs)), validate_args=False)


class GaussianPolicy(nn.Module):
    """Diagonal Gaussian with a state-independent log standard deviation.

    ``log_prob`` returns one value per action dimension; :mod:`natgrad.distributions`
    (and RAT's default ``log_prob_fn``) sum them.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        action_dim: int,
        hidden: tuple[int, ...],
        log_std_init: float = 0.0,
    ):
        super().__init__()
        self.torso = _torso(obs_shape, hidden)
        self.head = nn.Linear(self.torso.out_dim, action_dim)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    def forward(self, obs: Tensor) -> Distribution:
        """Return the action distribution for a batch of observations."""
        mean = self.head(self.torso(obs))
        return Normal(mean, self.log_std.exp().expand_as(mean), validate_args=False)


class ValueFunction(nn.Module):
    """State-value critic ``V(s)`` with its own torso (no sharing with the policy)."""

    def __init__(self, obs_shape: tuple[int, ...], hidden: tuple[int, ...]):
        super().__init__()
        self.torso = _torso(obs_shape, hidden)
        self.head = nn.Linear(self.torso.out_dim, 1)

    def forward(self, obs: Tensor) -> Tensor:
        """Return values of shape ``(N,)``."""
        return self.head(self.torso(obs)).squeeze(-1)


def _deprecated(name: str, replacement: Any) -> Any:
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"natgrad.rl.policies.{name} is deprecated; use natgrad.distributions."
            f"{replacement.__name__}",
            DeprecationWarning,
            stacklevel=2,
        )
        return replacement(*args, **kwargs)

    alias.__name__ = name
    alias.__doc__ = f"Deprecated alias of :func:`natgrad.distributions.{replacement.__name__}`."
    return alias


log_prob = _deprecated("log_prob", distributions.log_prob)
entropy = _deprecated("entropy", distributions.entropy)
sample_action = _deprecated("sample_action", distributions.sample)


def _init(module: nn.Module, generator: torch.Generator, head_gain: float) -> None:
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for i, layer in enumerate(layers):
        gain = head_gain if i == len(layers) - 1 else math.sqrt(2.0)
        nn.init.orthogonal_(layer.weight, gain=gain, generator=generator)
        nn.init.zeros_(layer.bias)


def _check_image(space: Any) -> None:
    """Refuse a 3-D observation space the ``(H, W, C)`` CNN would misread or cannot convolve.

    The last axis is read as channels: a last axis larger than ``H`` or ``W`` almost surely
    means a channel-first ``(C, H, W)`` image (read as ``H = C``), and the 3x3 kernel needs
    ``H, W >= 3``.
    """
    height, width, channels = space.shape
    read_as = f"read as an (H, W, C) image, channels last as MinAtar returns them: H={height}, "
    read_as += f"W={width}, C={channels}"
    if channels > min(height, width):
        raise ConfigError(
            f"observation space {space} is {read_as}; C is larger than H or W, so it looks "
            "channel-first (C, H, W). Wrap the env so it returns channels last, e.g. "
            "gymnasium.wrappers.TransformObservation(env, lambda o: o.transpose(1, 2, 0), "
            "<the transposed Box>), and register the wrapped env; if it really is channels "
            "last, flatten it for the MLP with gymnasium.wrappers.FlattenObservation"
        )
    if min(height, width) < 3:
        raise ConfigError(
            f"observation space {space} is {read_as}; the CNN's 3x3 convolution needs H and "
            "W >= 3; flatten it for the MLP with gymnasium.wrappers.FlattenObservation"
        )


def build_actor_critic(
    observation_space: Any,
    action_space: Any,
    hidden: tuple[int, ...],
    generator: torch.Generator,
) -> tuple[nn.Module, ValueFunction]:
    """Build a policy and a separate critic for Gymnasium spaces.

    Parameters
    ----------
    observation_space
        ``Box`` with shape ``(d,)`` (MLP) or ``(H, W, C)`` (MinAtar CNN; channels last,
        ``C <= min(H, W)`` and ``H, W >= 3``).
    action_space
        ``Discrete`` (categorical policy) or float ``Box`` of shape ``(k,)`` (diagonal
        Gaussian).
    hidden
        Hidden layer widths (the CNN uses the last one for its dense layer).
    generator
        Source of the initial weights.

    Raises
    ------
    ConfigError
        For unsupported spaces.
    """
    from gymnasium import spaces

    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) not in (1, 3):
        raise ConfigError(
            f"observation space {observation_space} is not supported; natgrad.rl handles Box "
            "observations of shape (d,) (MLP) or (H, W, C) images (CNN)"
        )
    obs_shape = tuple(observation_space.shape)
    if len(obs_shape) == 3:
        _check_image(observation_space)
    # Module constructors draw default inits from the global RNG; fork it so building a
    # policy leaves no trace there. The weights themselves come from ``generator`` below.
    with torch.random.fork_rng(devices=[]):
        if is_discrete(action_space):
            policy: nn.Module = CategoricalPolicy(obs_shape, int(action_space.n), hidden)
        elif isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
            if not np.issubdtype(action_space.dtype, np.floating):
                raise ConfigError(
                    f"action space {action_space} has dtype {action_space.dtype}, but the "
                    "diagonal Gaussian policy samples real-valued actions, which the env "
                    "would truncate or reject; give the env a float Box action space (e.g. "
                    "gymnasium.wrappers.TransformAction rounding to integers inside it) or a "
                    "Discrete one"
                )
            policy = GaussianPolicy(obs_shape, int(action_space.shape[0]), hidden)
        else:
            raise ConfigError(
                f"action space {action_space} is not supported; natgrad.rl handles Discrete "
                "(categorical policy) and 1-D Box (diagonal Gaussian policy) actions"
            )
        critic = ValueFunction(obs_shape, hidden)
    _init(policy, generator, head_gain=0.01)
    _init(critic, generator, head_gain=1.0)
    return policy, critic
