"""Experiment tracking with Weights & Biases: the callback behind ``natgrad train --track``.

Every row written to ``progress.csv`` is logged to a W&B run under the same names as the
TensorBoard events (``charts/episodic_return_mean``, ``train/kl``, ...), at the same
environment step, with ``config.json`` as the run's config. The run id is kept in the run
directory, so ``natgrad train --resume`` continues the same W&B run; rows that W&B already
holds (written after the last checkpoint, before the interruption) are not sent twice.

Without a W&B login (no ``WANDB_API_KEY``, no ``wandb login``) the run is written offline
to ``<out>/wandb/`` and can be uploaded later with ``wandb sync``; training never waits
for the network.
"""

from __future__ import annotations

import math
import netrc
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natgrad.errors import MissingExtraError
from natgrad.rl._errors import ConfigError
from natgrad.rl.callbacks import Callback

if TYPE_CHECKING:
    from natgrad.rl.train import Trainer

__all__ = ["WandbTracker", "wandb_mode"]

RUN_ID_NAME = "wandb_run_id"
MODES = ("online", "offline")


def _logged_in() -> bool:
    """Whether W&B has credentials: ``WANDB_API_KEY`` or a ``wandb login`` netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None = None) -> str:
    """The W&B mode a run uses: ``requested``, else ``$WANDB_MODE``, else by login.

    ``online`` when credentials are found, ``offline`` otherwise (so a machine without a
    login or network still trains and keeps the run for a later ``wandb sync``).
    """
    source = "--wandb-mode" if requested else "$WANDB_MODE"
    mode = requested or os.environ.get("WANDB_MODE") or ("online" if _logged_in() else "offline")
    mode = {"dryrun": "offline"}.get(mode, mode)  # W&B's own alias
    if mode == "disabled":
        return mode
    if mode not in MODES:
        raise ConfigError(
            f"{source} must be one of {', '.join(MODES)} or disabled (W&B's dryrun is "
            f"offline), got {mode!r}"
        )
    return mode


def _metric_name(key: str) -> str:
    return f"{'charts' if key.startswith('episodic') else 'train'}/{key}"


class WandbTracker(Callback):
    """Log each update's row to a Weights & Biases run.

    Parameters
    ----------
    project
        W&B project (default ``natgrad``).
    entity
        W&B team or user (default: the login's).
    group
        Group runs (e.g. one per algorithm) in the W&B interface.
    name
        Run name (default: the run directory's name).
    mode
        ``online`` or ``offline`` (default: :func:`wandb_mode`).
    tags
        Tags of the run.
    """

    def __init__(
        self,
        project: str = "natgrad",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        mode: str | None = None,
        tags: tuple[str, ...] = (),
    ) -> None:
        try:
            import wandb
        except ImportError as error:
            raise MissingExtraError("natgrad train --track", "track", "wandb") from error
        self._wandb = wandb
        self.project, self.entity, self.group, self.name = project, entity, group, name
        self.mode = wandb_mode(mode)
        self.tags = tuple(tags)
        self.run: Any = None
        self._first_new_step = 0

    def on_start(self, trainer: Trainer) -> None:
        wandb = self._wandb
        id_file = trainer.out_dir / RUN_ID_NAME
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        if self.mode == "offline" and not os.environ.get("WANDB_MODE"):
            print(
                f"natgrad: no W&B login found; logging offline to {trainer.out_dir / 'wandb'} "
                "(upload later with: wandb sync <that dir>/offline-run-*)",
                file=sys.stderr,
            )
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            name=self.name or trainer.out_dir.name,
            tags=list(self.tags) or None,
            id=run_id,
            resume="allow",
            config=trainer.config.to_dict(),
            dir=str(trainer.out_dir),
            mode=self.mode,
        )
        id_file.write_text(run_id + "\n")
        # W&B keeps the rows logged before an interruption: start after the last of them.
        self._first_new_step = int(getattr(self.run, "step", 0) or 0)

    def on_update(self, trainer: Trainer, row: dict[str, float]) -> None:
        if self.run is None:
            return
        step = int(row["step"])
        if step < self._first_new_step:
            return
        metrics = {
            _metric_name(key): value
            for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
        }
        self.run.log(metrics, step=step)

    def on_close(self, trainer: Trainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
