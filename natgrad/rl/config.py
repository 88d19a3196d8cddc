"""Every training hyperparameter in one dataclass, printed and saved as ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from natgrad._checks import check_nonnegative_int
from natgrad.rl._errors import ConfigError
from natgrad.solvers import SOLVERS

__all__ = ["TrainConfig"]


# Options that must be finite and > 0.
_POSITIVE = (
    "steps", "num_envs", "num_steps", "critic_lr", "critic_epochs", "critic_minibatch",
    "max_kl", "damping", "block_size", "rat_max_epochs", "rat_tol", "backtrack_iters",
    "cg_iters", "lr", "ppo_epochs", "ppo_minibatch", "clip_range", "kfac_damping",
    "kfac_max_lr", "checkpoint_every", "max_grad_norm", "max_rejections",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (shared machinery + every algorithm's knobs).

    Options that an algorithm does not use are ignored by it; ``docs/rl.md`` lists which
    algorithm reads which. Defaults train CartPole-v1 to 475 with ``rat-npg``.

    Attributes
    ----------
    env
        Gymnasium environment id, e.g. CartPole-v1, Pendulum-v1, Hopper-v5,
        MinAtar/Breakout-v1.
    algo
        Update rule, a key of ``natgrad.rl.ALGORITHMS``.
    steps
        Environment steps to train for, summed over parallel envs (rounded up to whole
        rollouts).
    seed
        Seed of every random stream of the run.
    num_envs
        Parallel environments; one update uses num_envs * num_steps samples.
    num_steps
        Steps per environment per rollout.
    gamma
        Discount factor.
    gae_lambda
        GAE(lambda) parameter.
    norm_obs
        Whiten vector observations with running statistics (images are left as is).
    norm_reward
        Divide rewards by the running std of the discounted return.
    hidden
        Hidden widths of the policy and critic MLPs (the CNN uses the last one).
    critic_lr
        Adam learning rate of the critic regression.
    critic_epochs
        Passes of the critic regression over each batch.
    critic_minibatch
        Minibatch size of the critic regression.
    max_kl
        KL trust region of rat-npg, rat-trpo, cg-trpo and kfac.
    kl_guard
        rat-npg: shrink a step whose measured KL exceeds kl_guard * max_kl (0 disables).
    damping
        RAT Tikhonov damping lambda, in units of F = J^T J / N.
    solver
        RAT solver for the N x N system: auto (CG on CPU, Cholesky on GPU for N <= 4096),
        kaczmarz, cholesky or cg.
    block_size
        RAT Kaczmarz block size.
    rat_max_epochs
        RAT Kaczmarz epochs before falling back to Cholesky (CG is capped at 200 iterations).
    rat_tol
        RAT relative residual tolerance.
    rat_preconditioner_rank
        Rank of the Nystrom preconditioner of RAT's CG (0 turns it off).
    backtrack_iters
        Candidates tried by the line search of rat-trpo and cg-trpo.
    backtrack_coeff
        Shrink factor between line-search candidates.
    cg_iters
        Conjugate-gradient iterations of cg-trpo.
    cg_damping
        Damping added to the Fisher-vector products of cg-trpo.
    lr
        Adam learning rate of vpg, a2c and ppo.
    max_grad_norm
        Gradient-norm clip of vpg, a2c and ppo.
    ent_coef
        Entropy bonus of vpg, a2c and ppo.
    ppo_epochs
        PPO optimization epochs per batch.
    ppo_minibatch
        PPO minibatch size.
    clip_range
        PPO ratio clip.
    kfac_damping
        K-FAC Tikhonov damping.
    kfac_decay
        Moving-average decay of the K-FAC factors.
    kfac_max_lr
        ACKTR's largest K-FAC step.
    kl_reject
        Reject an update whose measured KL exceeds kl_reject * max_kl (rat-npg, rat-trpo,
        cg-trpo, kfac; 0 disables); updates with non-finite results or solver errors are
        always rejected, with parameters and optimizer state restored.
    max_rejections
        Stop the run after this many consecutive rejected updates.
    checkpoint_every
        Save a checkpoint every this many updates (and always at the end).
    threads
        torch.set_num_threads while Trainer.run trains (0 leaves the current setting). One thread is
        fastest for small policies, whose tiny matmuls lose more to thread hand-offs than
        they gain.
    """

    env: str = "CartPole-v1"
    algo: str = "rat-npg"
    steps: int = 100_000
    seed: int = 0
    num_envs: int = 8
    num_steps: int = 256
    gamma: float = 0.99
    gae_lambda: float = 0.95
    norm_obs: bool = True
    norm_reward: bool = True
    hidden: tuple[int, ...] = (64, 64)
    critic_lr: float = 1e-3
    critic_epochs: int = 10
    critic_minibatch: int = 256
    max_kl: float = 0.02
    kl_guard: float = 2.0
    damping: float = 0.1
    solver: str = "auto"
    block_size: int = 256
    rat_max_epochs: int = 20
    rat_tol: float = 1e-3
    rat_preconditioner_rank: int = 256
    backtrack_iters: int = 10
    backtrack_coeff: float = 0.5
    cg_iters: int = 10
    cg_damping: float = 0.1
    lr: float = 3e-4
    max_grad_norm: float = 0.5
    ent_coef: float = 0.0
    ppo_epochs: int = 10
    ppo_minibatch: int = 64
    clip_range: float = 0.2
    kfac_damping: float = 1e-2
    kfac_decay: float = 0.95
    kfac_max_lr: float = 0.25
    kl_reject: float = 10.0
    max_rejections: int = 3
    checkpoint_every: int = 10
    threads: int = 1

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.validate()

    @property
    def batch_size(self) -> int:
        """Samples per update, ``num_envs * num_steps``."""
        return self.num_envs * self.num_steps

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option and its allowed range."""
        from natgrad.rl.algorithms import ALGORITHMS

        if self.algo not in ALGORITHMS:
            raise ConfigError(
                f"unknown algorithm --algo {self.algo!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        for name in _POSITIVE:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value!r}")
        for name in ("kl_guard", "kl_reject"):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value == 0 or value >= 1)):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be 0 (off) or >= 1 (a factor of "
                    f"--max-kl), got {value!r}"
                )
        for name in ("cg_damping", "ent_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value!r}")
        if self.batch_size < 2:
            raise ConfigError(
                f"--num-envs {self.num_envs} x --num-steps {self.num_steps} gives "
                f"{self.batch_size} sample per update, but advantages are normalized by "
                "their standard deviation, which needs at least 2; raise --num-steps"
            )
        for name in ("gamma", "gae_lambda", "kfac_decay", "backtrack_coeff"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value!r}")
        try:
            check_nonnegative_int(
                "--rat-preconditioner-rank", self.rat_preconditioner_rank, " (0 turns it off)"
            )
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from None
        if self.solver not in SOLVERS:
            raise ConfigError(f"--solver must be one of {', '.join(SOLVERS)}; got {self.solver!r}")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"--hidden must be positive widths, got {self.hidden!r}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.threads < 0:
            raise ConfigError(
                f"--threads must be >= 1, or 0 to keep torch's current setting; got {self.threads}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option (JSON-serializable)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["hidden"] = list(self.hidden)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        """Pretty JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
