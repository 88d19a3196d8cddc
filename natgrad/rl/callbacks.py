"""Small pieces that :meth:`natgrad.rl.Trainer.run` calls around its updates.

Each callback does one thing (a progress bar, the checkpoint cadence, the solved
threshold, ...) through four hooks, all optional:

* ``on_start(trainer)`` before the first update;
* ``on_update(trainer, row)`` after each update, with the row just logged;
* ``on_finish(trainer)`` once the step budget is reached (not after an error);
* ``on_close(trainer)`` always, last, in reverse order (undo global changes).

Pass your own to ``Trainer.run(callbacks=[...])``; they run after the built-in ones.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from natgrad.rl._errors import ConfigError, TrainingError
from natgrad.rl.checkpoint import CHECKPOINT_NAME

if TYPE_CHECKING:
    from natgrad.rl.train import Trainer

__all__ = [
    "Callback",
    "Checkpoints",
    "LearningCurve",
    "ProgressBar",
    "RejectionLimit",
    "SolvedThreshold",
    "Threads",
]

CURVE_NAME = "learning_curve.png"


class Callback:
    """Base class: every hook does nothing."""

    def on_start(self, trainer: Trainer) -> None:
        """Before the first update of :meth:`~natgrad.rl.Trainer.run`."""

    def on_update(self, trainer: Trainer, row: dict[str, float]) -> None:
        """After each update; ``row`` is what was logged to ``progress.csv``."""

    def on_finish(self, trainer: Trainer) -> None:
        """When the step budget is reached."""

    def on_close(self, trainer: Trainer) -> None:
        """Always, last (also after an error or an interrupt)."""


class Threads(Callback):
    """``torch.set_num_threads(threads)`` while training, restored afterwards (0: no change)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.saved: int | None = None

    def on_start(self, trainer: Trainer) -> None:
        self.saved = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)

    def on_close(self, trainer: Trainer) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved)


class SolvedThreshold(Callback):
    """Record the first step whose recent mean return reaches ``threshold`` (``None``: off).

    Training continues to the budget; the step is ``trainer.solved_step``.
    """

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold

    def on_update(self, trainer: Trainer, row: dict[str, float]) -> None:
        recent = row["episodic_return_mean"]
        if (
            self.threshold is not None
            and trainer.solved_step is None
            and math.isfinite(recent)
            and recent >= self.threshold
        ):
            trainer.solved_step = trainer.global_step


class RejectionLimit(Callback):
    """Stop with :class:`~natgrad.rl.TrainingError` after ``limit`` consecutive rejected updates.

    It runs before :class:`Checkpoints`, so the checkpoint on disk predates the rejections.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def on_update(self, trainer: Trainer, row: dict[str, float]) -> None:
        if trainer.consecutive_rejections >= self.limit:
            raise TrainingError(
                f"training stopped at step {trainer.global_step}: "
                f"{trainer.consecutive_rejections} consecutive policy updates were rejected "
                f"(--max-rejections {self.limit}; the last: {trainer.last_fault}); "
                f"{trainer.checkpoint_note()}; fix the cause "
                "(e.g. a larger --damping or a smaller --max-kl) in a new run"
            )


class Checkpoints(Callback):
    """Save every ``every`` updates and when the budget is reached (see :meth:`Trainer.save`)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_update(self, trainer: Trainer, row: dict[str, float]) -> None:
        done = trainer.global_step >= trainer.config.steps
        if done or trainer.iteration % self.every == 0:
            trainer.save()

    def on_finish(self, trainer: Trainer) -> None:
        # A resumed run already at its budget takes no update, yet leaves a checkpoint.
        if trainer.iteration == 0 or not (trainer.out_dir / CHECKPOINT_NAME).exists():
            trainer.save()


class ProgressBar(Callback):
    """A tqdm bar of steps with steps/s, recent return and KL (nothing if tqdm is missing)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_start(self, trainer: Trainer) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is in natgrad[rl]; training works without it
            return
        cfg = trainer.config
        self.bar = tqdm(
            total=cfg.steps, initial=min(trainer.global_step, cfg.steps), unit="step",
            dynamic_ncols=True, desc=f"{cfg.env} {cfg.algo}",
        )  # fmt: skip

    def on_update(self, trainer: Trainer, row: dict[str, float]) -> None:
        if self.bar is None:
            return
        cfg = trainer.config
        self.bar.update(min(cfg.batch_size, cfg.steps - self.bar.n))
        self.bar.set_postfix(
            {"steps/s": f"{row['steps_per_sec']:.0f}",
             "return": f"{row['episodic_return_mean']:.1f}", "kl": f"{row['kl']:.4f}"},
            refresh=False,
        )  # fmt: skip

    def on_close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class LearningCurve(Callback):
    """Plot ``progress.csv`` to ``learning_curve.png`` at the end (nothing without matplotlib)."""

    def on_finish(self, trainer: Trainer) -> None:
        from natgrad.rl.plotting import plot_runs

        try:
            plot_runs(
                [trainer.out_dir],
                trainer.out_dir / CURVE_NAME,
                title=f"{trainer.config.env}",
                flag="the learning curve",
            )
        except ImportError:  # matplotlib missing: the CSV is the record
            pass
        except ConfigError as error:  # the run is complete; only its figure is missing
            warnings.warn(
                f"{error}; the run itself is complete (progress.csv and the checkpoints are "
                f"written): draw the curve later with `natgrad plot {trainer.out_dir}`",
                RuntimeWarning,
                stacklevel=2,
            )
