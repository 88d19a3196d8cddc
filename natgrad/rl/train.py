"""The training loop shared by every algorithm: rollout, GAE, policy update, critic fit."""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from natgrad.distributions import entropy
from natgrad.distributions import kl as kl_divergence
from natgrad.errors import NatgradError
from natgrad.rl._errors import (
    CheckpointError,
    ConfigError,
    EnvOutputError,
    MissingExtraError,
    first_line,
)
from natgrad.rl.algorithms import make_algorithm
from natgrad.rl.callbacks import (
    CURVE_NAME,
    Callback,
    Checkpoints,
    LearningCurve,
    ProgressBar,
    RejectionLimit,
    SolvedThreshold,
    Threads,
)
from natgrad.rl.checkpoint import (
    CHECKPOINT_NAME,
    POLICY_NAME,
    atomic_write_text,
    checkpoint_content,
    load_checkpoint,
    save_checkpoint,
)
from natgrad.rl.config import TrainConfig
from natgrad.rl.critic import CriticTrainer
from natgrad.rl.envs import env_state, is_discrete, make_vec_env, restore_env_state
from natgrad.rl.logger import PROGRESS_NAME, RunLogger
from natgrad.rl.normalize import ObsNormalizer, RewardScaler, as_tensor
from natgrad.rl.parallel import LocalRun, NullLogger
from natgrad.rl.policies import build_actor_critic
from natgrad.rl.rollout import Collector, RolloutBuffer

__all__ = ["CURVE_NAME", "Trainer", "TrainResult", "default_out_dir", "train"]

NOTHING_SAVED = "no checkpoint was written yet, so nothing is saved: start the run again"


def default_out_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<env>-<algo>-s<seed>-<YYYYmmdd-HHMMSS>`` (``/`` in env ids becomes ``_``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    env = config.env.replace("/", "_")
    return Path(root) / f"{env}-{config.algo}-s{config.seed}-{stamp}"


def _seeds(seed: int) -> dict[str, int]:
    # Independent streams per consumer, so e.g. changing the critic's minibatch count does
    # not change which actions are sampled.
    names = ("init", "actions", "envs", "critic", "algo")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: int(c.generate_state(1)[0]) for n, c in zip(names, children, strict=True)}


def _require_config(config: Any) -> TrainConfig:
    """``config`` if it is a :class:`TrainConfig`, else :class:`ConfigError` saying so."""
    if config is None:
        raise ConfigError("a TrainConfig is required unless resuming")
    if not isinstance(config, TrainConfig):
        hint = (
            "; build one with TrainConfig.from_dict(...)"
            if isinstance(config, dict)
            else f"; for an environment id write TrainConfig(env={config!r})"
            if isinstance(config, str)
            else ""
        )
        raise ConfigError(
            f"config must be a natgrad.rl.TrainConfig, got {type(config).__name__}{hint}"
        )
    return config


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create output directory --out {str(out_dir)!r}: {error.strerror}; "
            "choose a writable path"
        ) from error
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output directory --out {str(out_dir)!r} is not writable; choose a writable path"
        )


def refuse_existing_run(out_dir: Path) -> None:
    """Refuse to start a new run in a directory that holds one (it would be overwritten)."""
    if (out_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(
            f"--out {str(out_dir)!r} already holds a run; pass --resume (resume=True) to "
            "continue it or choose another directory"
        )


def saved_run_note(out_dir: Path, flags: str = "") -> str:
    """What a stopped run in ``out_dir`` has saved and how to continue it, read from its files.

    For a process that did not train the run itself (the ``--nproc`` launcher): the step
    of the checkpoint on disk, checked against its recorded digest.

    Parameters
    ----------
    out_dir
        The run directory.
    flags
        Further flags the ``--resume`` command needs (``"--nproc 2"``).
    """
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.exists():
        return NOTHING_SAVED
    try:
        step = int(load_checkpoint(path)["global_step"])
    except CheckpointError as error:
        return f"the checkpoint cannot be read: {error}"
    return _continue_from(step, out_dir, flags)


def _continue_from(step: int | None, out_dir: Path, flags: str = "") -> str:
    """The resume note for a checkpoint at ``step`` (``None``: nothing saved)."""
    if step is None:
        return NOTHING_SAVED
    resume = " ".join(["--resume --out", str(out_dir), flags]).strip()
    return f"the last checkpoint (step {step}) is intact: continue with {resume}"


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished :meth:`Trainer.run`.

    Attributes
    ----------
    out_dir
        Run directory.
    steps
        Environment steps taken in total (across resumes).
    final_return
        ``episodic_return_mean`` of the last update: the mean return of the last 20
        finished episodes (of every rank when data-parallel), NaN if none.
    best_return
        Highest ``episodic_return_mean`` logged.
    solved_step
        First logged step at which ``episodic_return_mean >= solved_threshold``, if any.
    wall_time
        Seconds of training in total (across resumes).
    """

    out_dir: Path
    steps: int
    final_return: float
    best_return: float
    solved_step: int | None
    wall_time: float


class Trainer:
    """Build everything a run needs from a :class:`TrainConfig` and run it.

    Parameters
    ----------
    config
        Hyperparameters; the run uses :meth:`TrainConfig.resolved` (its preset applied
        under the values set explicitly; ``config`` itself is not changed). Ignored when
        resuming (the saved config is used, preset values included; only ``steps`` may be
        raised through ``steps``).
    out_dir
        Run directory for ``config.json``, ``progress.csv``, ``checkpoint.pt`` (see
        :mod:`natgrad.rl.checkpoint`), ``policy.safetensors``, TensorBoard events and
        ``learning_curve.png``.
    resume
        Continue the run saved in ``out_dir`` where its checkpoint left off. Nothing in
        the checkpoint is unpickled: without ``trust_env_state`` the episodes in progress
        are dropped and the environments re-seeded (deterministically, with a warning).
    steps
        With ``resume``: new total step budget (default: the saved one); at least the
        steps already taken.
    tensorboard
        Write TensorBoard events if ``tensorboard`` is installed.
    trust_env_state
        With ``resume``: unpickle the saved environments (``checkpoint.env.pkl``), so the
        run continues bit for bit. Unpickling runs code from the file: only for run
        directories you trust.
    parallel
        The run layout: :class:`~natgrad.rl.parallel.LocalRun` (the default, one process)
        or a :class:`~natgrad.rl.parallel.DataParallel` rank (``natgrad train --nproc K``),
        which shares the batch with the other ranks; only rank 0 writes ``out_dir``.

    Raises
    ------
    ConfigError
        An unusable option or output directory (nothing is written).
    CheckpointError
        ``resume`` and the checkpoint is missing, damaged or not natgrad's.
    """

    def __init__(
        self,
        config: TrainConfig | None,
        out_dir: str | Path,
        resume: bool = False,
        steps: int | None = None,
        tensorboard: bool = True,
        trust_env_state: bool = False,
        parallel: LocalRun | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.parallel = parallel = parallel if parallel is not None else LocalRun()
        self.resume_note: str | None = None
        checkpoint = None
        if trust_env_state and not resume:
            raise ConfigError("--trust-env-state applies to --resume only; add --resume")
        if steps is not None and not resume:
            raise ConfigError(
                "steps= (--steps with --resume) sets a resumed run's new budget and applies "
                "to resume=True only; for a new run set TrainConfig(steps=...)"
            )
        if resume:
            checkpoint = parallel.load_checkpoint(self.out_dir)
            with checkpoint_content(self.out_dir / CHECKPOINT_NAME):
                config = TrainConfig.from_dict(checkpoint["config"])
                done = int(checkpoint["global_step"])
            if steps is not None:
                config.steps = steps
                config.validate()  # its type and range, named --steps
                if config.steps < done:
                    raise ConfigError(
                        f"--steps {steps} is below the {done} steps this run has already "
                        f"taken; pass --steps {done} or more (or evaluate it: natgrad eval "
                        f"{self.out_dir})"
                    )
        config = _require_config(config)
        if checkpoint is None:  # a resumed run keeps the preset values it recorded
            config = config.resolved()
        self.config = config
        seeds = parallel.rank_seeds(_seeds(config.seed), config.seed)
        self.env = make_vec_env(config.env, config.num_envs)
        obs_space = self.env.single_observation_space
        act_space = self.env.single_action_space
        init = torch.Generator().manual_seed(seeds["init"])
        # after the env and the policy: a typo in --env or an unsupported space must not
        # leave an empty run directory behind
        try:
            self.policy, self.critic = build_actor_critic(obs_space, act_space, config.hidden, init)
            if parallel.is_writer:
                if not resume:
                    refuse_existing_run(self.out_dir)
                _check_writable(self.out_dir)
        except ConfigError:
            self.env.close()
            raise
        obs_shape = tuple(obs_space.shape)
        self.collector = Collector(
            self.env,
            ObsNormalizer(obs_shape, enabled=config.norm_obs and len(obs_shape) == 1),
            RewardScaler(config.num_envs, config.gamma, enabled=config.norm_reward),
            config.gamma,
        )
        discrete = is_discrete(act_space)
        self.buffer = RolloutBuffer(
            config.num_steps,
            config.num_envs,
            obs_shape,
            () if discrete else tuple(act_space.shape),
            discrete,
        )
        self.algo = make_algorithm(config.algo, self.policy, config.options, seeds["algo"])
        self.critic_trainer = CriticTrainer(
            self.critic,
            config.critic_lr,
            config.critic_epochs,
            config.critic_minibatch,
            seeds["critic"],
        )
        self.action_generator = torch.Generator().manual_seed(seeds["actions"])
        self.global_step = 0
        self.iteration = 0
        self.wall_time = 0.0
        self.best_return = -math.inf
        self.last_return: float | None = None  # episodic_return_mean of the last update
        self.solved_step: int | None = None
        self.rejected_updates = 0
        self.consecutive_rejections = 0
        self.last_fault: str | None = None
        self.saved_step: int | None = None
        self._warned: set[type[Warning]] = set()
        self._registry: dict[Any, Any] = {}
        self._policy_export = True
        parallel.attach(self)
        if checkpoint is None:
            self.collector.reset(seeds["envs"])
        else:
            with checkpoint_content(self.out_dir / CHECKPOINT_NAME):
                self._load(parallel.rank_state(checkpoint), seeds["envs"], trust_env_state)
        self.logger: RunLogger | NullLogger = NullLogger()
        if parallel.is_writer:
            try:
                with self._writing(self.out_dir / "config.json"):
                    atomic_write_text(self.out_dir / "config.json", config.to_json() + "\n")
                with self._writing(self.out_dir / PROGRESS_NAME):
                    self.logger = RunLogger(
                        self.out_dir,
                        resume_step=self.global_step if checkpoint is not None else None,
                        tensorboard=tensorboard,
                    )
            except ConfigError:
                self.env.close()
                raise

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run but the environments: tensors and plain data."""
        return {
            "config": self.config.to_dict(),
            "global_step": self.global_step,
            "iteration": self.iteration,
            "wall_time": self.wall_time,
            "best_return": self.best_return,
            "solved_step": self.solved_step,
            "rejected_updates": self.rejected_updates,
            "consecutive_rejections": self.consecutive_rejections,
            "policy": self.policy.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_trainer": self.critic_trainer.state_dict(),
            "algo": self.algo.state_dict(),
            "action_generator": self.action_generator.get_state(),
            "collector": self.collector.state_dict(),
        }

    def _load(self, state: dict[str, Any], env_seed: int, trust_env_state: bool) -> None:
        self.global_step = self.saved_step = int(state["global_step"])
        self.iteration = int(state["iteration"])
        self.wall_time = float(state["wall_time"])
        self.best_return = float(state["best_return"])
        self.solved_step = state["solved_step"]
        self.rejected_updates = int(state["rejected_updates"])
        self.consecutive_rejections = int(state["consecutive_rejections"])
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        self.critic_trainer.load_state_dict(state["critic_trainer"])
        self.algo.load_state_dict(state["algo"])
        self.action_generator.set_state(state["action_generator"])
        self.collector.load_state_dict(state["collector"])
        digest = state["env_state_sha256"]
        if trust_env_state and digest is not None:
            saved = self.parallel.load_env_state(self.out_dir, digest)
            restore_env_state(self.env, saved)
            return
        if digest is None:
            why = f"the environments of {self.config.env} could not be saved"
        else:
            why = "the saved environments are pickled and load only with --trust-env-state"
        # Re-seeded from the run's seed and the update count: a resume is reproducible.
        seed = int(np.random.SeedSequence([env_seed, self.iteration]).generate_state(1)[0])
        self.resume_note = (
            f"{why}, so the episodes in progress were dropped and the environments re-seeded "
            f"at step {self.global_step}: the run continues deterministically, but not bit "
            "for bit as an uninterrupted one"
        )
        warnings.warn(self.resume_note, RuntimeWarning, stacklevel=3)
        self.collector.reset(seed)

    def save(self) -> None:
        """Write ``checkpoint.pt``, the environments and ``policy.safetensors``."""
        path = self.out_dir / CHECKPOINT_NAME
        state = self.parallel.gather_state(self.state_dict())
        envs = self.parallel.gather_env_state(env_state(self.env))
        if not self.parallel.is_writer:
            self.saved_step = self.global_step
            return
        with self._writing(path):
            try:
                save_checkpoint(path, state, env_state=envs, policy=self._policy_file())
            except MissingExtraError as error:  # safetensors missing: the checkpoint counts
                self._policy_export = False
                warnings.warn(
                    f"{error}; {POLICY_NAME} is not written", RuntimeWarning, stacklevel=2
                )
                save_checkpoint(path, state, env_state=envs)
        self.saved_step = self.global_step

    def _policy_file(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """Tensors and metadata of ``policy.safetensors``: all ``natgrad eval`` needs."""
        if not self._policy_export:
            return None
        norm = self.collector.obs_norm
        tensors = {f"policy.{k}": v for k, v in self.policy.state_dict().items()}
        tensors["obs_norm.mean"] = as_tensor(norm.rms.mean)
        tensors["obs_norm.var"] = as_tensor(norm.rms.var)
        metadata = {
            "format": "natgrad-policy-1",
            "config": self.config.to_json(),
            "global_step": str(self.global_step),
            "obs_norm": json.dumps(
                {"enabled": norm.enabled, "clip": norm.clip, "count": norm.rms.count}
            ),
        }
        return tensors, metadata

    def checkpoint_note(self) -> str:
        """Where the last checkpoint stands, for error messages."""
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the last checkpoint (step {self.saved_step}) is intact"

    def continue_note(self) -> str:
        """Where the last checkpoint stands and how to go on from it, for error messages."""
        return _continue_from(self.saved_step, self.out_dir)

    @contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """Report a failure to write ``path`` (disk full, read-only) as a ``ConfigError``."""
        try:
            yield
        except OSError as error:
            raise ConfigError(
                f"cannot write {error.filename or path}: {error.strerror or error}; free "
                f"space or make {str(self.out_dir)!r} writable; {self.continue_note()}"
            ) from None

    # -- fault handling -----------------------------------------------------------------
    def _snapshot(self) -> tuple[dict[str, Any], ...]:
        """Copies of everything a policy or critic update changes, for a rollback."""
        return (
            {k: v.clone() for k, v in self.policy.state_dict().items()},
            copy.deepcopy(self.algo.state_dict()),
            {k: v.clone() for k, v in self.critic.state_dict().items()},
            copy.deepcopy(self.critic_trainer.state_dict()),
        )

    def _policy_fault(self, kl: float, stats: dict[str, float]) -> str | None:
        """Why the policy update just taken must be rejected (``None``: keep it)."""
        if not all(bool(torch.isfinite(p).all()) for p in self.policy.parameters()):
            return "the update made policy parameters NaN or infinite"
        if not math.isfinite(kl):
            return f"the KL between the old and the updated policy is {kl}"
        target = stats.get("kl_target", math.nan)
        limit = self.config.kl_reject * target
        if self.config.kl_reject > 0 and math.isfinite(target) and kl > limit:
            return (
                f"its KL {kl:.3g} exceeds --kl-reject {self.config.kl_reject:g} x the target "
                f"{target:g}"
            )
        return None

    def _reemit(self, caught: list[warnings.WarningMessage]) -> int:
        """Re-issue warnings caught in an update; natgrad's own only once per run.

        The rest go through Python's usual once-per-location filter, as if not caught.
        Returns the number of natgrad's own warnings.
        """
        own = 0
        for record in caught:
            if not record.category.__module__.startswith("natgrad"):
                warnings.warn_explicit(
                    record.message, record.category, record.filename, record.lineno,
                    registry=self._registry,
                )  # fmt: skip
                continue
            own += 1
            if record.category not in self._warned:
                self._warned.add(record.category)
                warnings.warn(
                    f"{record.message} (in the policy update at step {self.global_step}; "
                    "later warnings of this kind are counted in progress.csv column "
                    "update_warnings)",
                    record.category,
                    stacklevel=3,
                )
        return own

    # -- the loop -----------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Collect one rollout and update policy and critic; return the logged row."""
        cfg, parallel = self.config, self.parallel
        start = time.perf_counter()
        try:
            finished = self.collector.collect(
                self.policy, self.critic, self.buffer, self.action_generator
            )
        except EnvOutputError as error:
            raise EnvOutputError(f"{error}; {self.checkpoint_note()}") from None
        parallel.sync_statistics(self.collector)
        steps = cfg.batch_size * parallel.world_size  # every rank's environment steps
        self.global_step += steps
        self.iteration += 1
        batch = self.buffer.batch(cfg.gamma, cfg.gae_lambda)
        adv = batch.advantages
        if cfg.norm_adv:
            adv = parallel.normalize_advantages(adv)
        with torch.no_grad():
            old_dist = self.policy(batch.obs)
            old_entropy = float(parallel.mean(entropy(old_dist)))
        policy_state, algo_state, critic_state, critic_trainer_state = self._snapshot()
        stats: dict[str, float] = {}
        kl = math.nan
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                stats = self.algo.update(batch.obs, batch.acts, batch.log_probs, adv)
            except (NatgradError, torch.linalg.LinAlgError) as error:
                fault: str | None = first_line(error)
            else:
                with torch.no_grad():
                    kl = float(parallel.mean(kl_divergence(old_dist, self.policy(batch.obs))))
                fault = self._policy_fault(kl, stats)
        own_warnings = self._reemit(caught)
        if fault is not None:
            # Bit-identical rollback: load_state_dict copies into the same tensors.
            self.policy.load_state_dict(policy_state)
            self.algo.load_state_dict(algo_state)
            kl = 0.0
        value_loss = self.critic_trainer.fit(batch.obs, batch.returns)
        if not all(bool(torch.isfinite(p).all()) for p in self.critic.parameters()):
            self.critic.load_state_dict(critic_state)
            self.critic_trainer.load_state_dict(critic_trainer_state)
            fault = fault or "the critic update made its parameters NaN or infinite"
        self.last_fault = fault
        if fault is None:
            self.consecutive_rejections = 0
        else:
            self.rejected_updates += 1
            self.consecutive_rejections += 1
            warnings.warn(
                f"update {self.iteration} (step {self.global_step}) rejected and rolled back: "
                f"{fault}",
                RuntimeWarning,
                stacklevel=2,
            )
        seconds = time.perf_counter() - start
        self.wall_time += seconds
        episodes = parallel.episodes(self.collector, finished)
        recent = episodes["episodic_return_mean"]
        self.last_return = recent
        if math.isfinite(recent):
            self.best_return = max(self.best_return, recent)
        row: dict[str, float] = {
            "step": self.global_step,
            "iteration": self.iteration,
            **episodes,
            "kl": kl,
            "kl_target": stats.pop("kl_target", math.nan),
            "entropy": old_entropy,
            "value_loss": value_loss,
            "steps_per_sec": steps / seconds,
            "wall_time": self.wall_time,
            "update_rejected": float(fault is not None),
            "rejected_updates": self.rejected_updates,
            "update_warnings": own_warnings,
            **stats,
        }
        if math.isfinite(row["kl_target"]):
            row["kl_ratio"] = kl / row["kl_target"]
        return row

    def run(
        self,
        progress: bool = True,
        solved_threshold: float | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> TrainResult:
        """Train until ``config.steps`` environment steps, checkpointing on the way.

        Parameters
        ----------
        progress
            Show a tqdm progress bar (steps, steps/s, recent return, KL).
        solved_threshold
            Record the first step whose recent mean return reaches this value
            (training continues to the budget).
        callbacks
            More :class:`~natgrad.rl.callbacks.Callback` objects, called after the built-in
            ones (threads, solved threshold, rejection limit, checkpoints, progress bar,
            learning curve).

        Raises
        ------
        ConfigError
            A file of the run cannot be written (disk full, read-only file system); the
            message names it and the last checkpoint, which is intact.
        TrainingError
            ``config.max_rejections`` consecutive updates were rejected.
        """
        cfg = self.config
        callbacks = self.parallel.callbacks(
            [
                Threads(cfg.threads),
                SolvedThreshold(solved_threshold),
                RejectionLimit(cfg.max_rejections),
                Checkpoints(cfg.checkpoint_every),
                *([ProgressBar()] if progress else []),
                LearningCurve(),
                *callbacks,
            ]
        )
        try:
            for callback in callbacks:
                callback.on_start(self)
            while self.global_step < cfg.steps:
                row = self.step()
                with self._writing(self.out_dir / PROGRESS_NAME):
                    self.logger.write(row)
                for callback in callbacks:
                    callback.on_update(self, row)
            for callback in callbacks:
                callback.on_finish(self)
        finally:
            for callback in reversed(callbacks):
                callback.on_close(self)
            self.logger.close()
        return TrainResult(
            out_dir=self.out_dir,
            steps=self.global_step,
            # the logged value (every rank's episodes when data-parallel)
            final_return=self.collector.recent_return()
            if self.last_return is None
            else self.last_return,
            best_return=self.best_return,
            solved_step=self.solved_step,
            wall_time=self.wall_time,
        )

    def close(self) -> None:
        """Close the environments."""
        self.env.close()


def train(
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
    tensorboard: bool = True,
) -> TrainResult:
    """Train one run and return its summary (the Python entry point of ``natgrad train``).

    Parameters
    ----------
    config
        Hyperparameters (default: :class:`TrainConfig` defaults, CartPole-v1 with rat-npg).
    out_dir
        Run directory (default: :func:`default_out_dir`).
    progress
        Show a progress bar.
    tensorboard
        Write TensorBoard events if tensorboard is installed.
    """
    config = _require_config(TrainConfig() if config is None else config)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config)
    trainer = Trainer(config, out_dir, tensorboard=tensorboard)
    try:
        return trainer.run(progress=progress)
    finally:
        trainer.close()


def summary_json(result: TrainResult) -> str:
    """JSON summary of a :class:`TrainResult` (printed by the CLI)."""
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
    return json.dumps(data, indent=2)
