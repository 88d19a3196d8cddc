"""On-policy reinforcement learning with RAT natural gradients and fair baselines.

Every algorithm shares the same rollouts (Gymnasium vector envs), GAE(lambda),
observation/reward normalization and separately trained critic; they differ only in the
policy update (see :data:`ALGORITHMS`). Requires the ``rl`` extra
(``pip install "natgrad[rl]"``).
"""

from natgrad.rl._errors import (
    CheckpointError,
    ConfigError,
    EnvOutputError,
    MissingExtraError,
    TrainingError,
)
from natgrad.rl.algorithms import ALGORITHMS, PolicyUpdate
from natgrad.rl.config import TrainConfig
from natgrad.rl.evaluate import EvalResult, evaluate
from natgrad.rl.plotting import plot_runs
from natgrad.rl.presets import PRESETS, Preset, preset_for_env
from natgrad.rl.train import Trainer, TrainResult, default_out_dir, train

__all__ = [
    "ALGORITHMS",
    "CheckpointError",
    "ConfigError",
    "EvalResult",
    "MissingExtraError",
    "PRESETS",
    "PolicyUpdate",
    "Preset",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "EnvOutputError",
    "default_out_dir",
    "evaluate",
    "plot_runs",
    "preset_for_env",
    "train",
]
