"""What the ranks of a data-parallel run share, and how (``natgrad train --nproc K``).

The :class:`~natgrad.rl.train.Trainer` asks a *run layout* for every quantity that spans
the batch: :class:`LocalRun` is one process (each method is the single-process
arithmetic, unchanged), :class:`DataParallel` one rank of a ``torch.distributed`` group.
Each rank steps its own environments; a :class:`DataParallel` rank

* normalizes advantages with the mean and standard deviation of the union of the batches;
* solves for the natural gradient of the union (``RATNaturalGradient(process_group=...)``)
  and measures KLs, entropies and line-search surrogates as global means;
* averages the critic's gradients over ranks before every Adam step;
* merges the observation and reward statistics each update (:func:`merge_statistics`);
* writes nothing unless it is rank 0, whose checkpoint holds every rank's own state.

So every rank ends every update with bit-identical policy and critic parameters.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from natgrad.rl._errors import CheckpointError, ConfigError
from natgrad.rl.callbacks import Callback, Checkpoints, LearningCurve, ProgressBar
from natgrad.rl.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_env_state
from natgrad.rl.normalize import RunningMeanStd

if TYPE_CHECKING:
    from natgrad.rl.rollout import Collector
    from natgrad.rl.train import Trainer

__all__ = [
    "RANK_KEYS",
    "DataParallel",
    "LocalRun",
    "NullLogger",
    "TrackedRunningMeanStd",
    "merge_statistics",
    "rank_seeds",
]

RANK_KEYS = ("action_generator", "collector", "critic_trainer", "algo")
"""Entries of :meth:`Trainer.state_dict` that differ between ranks (saved per rank)."""

_ENV_FORMAT = "natgrad-data-parallel-envs-1"


def rank_seeds(seeds: dict[str, int], seed: int, rank: int) -> dict[str, int]:
    """The trainer's seeds on ``rank``: rank 0 keeps the single-process ones.

    Rank ``r >= 1`` draws its actions and environment seeds from
    ``numpy.random.SeedSequence([seed, r])`` (children 0 and 1); the initialization, the
    critic's shuffling and the algorithm's seed are those of rank 0 on every rank.
    """
    if rank == 0:
        return dict(seeds)
    actions, envs = np.random.SeedSequence([seed, rank]).spawn(2)
    return {
        **seeds,
        "actions": int(actions.generate_state(1)[0]),
        "envs": int(envs.generate_state(1)[0]),
    }


class NullLogger:
    """The logger of ranks other than 0: writes nothing."""

    def write(self, row: dict[str, float]) -> None:
        """Drop ``row``."""

    def close(self) -> None:
        """Nothing to close."""


class LocalRun:
    """One process: every method is the trainer's single-process arithmetic."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the run directory (rank 0)."""
        return self.rank == 0

    def rank_seeds(self, seeds: dict[str, int], seed: int) -> dict[str, int]:
        """The seeds of :attr:`rank` (see :func:`rank_seeds`)."""
        return rank_seeds(seeds, seed, self.rank)

    def attach(self, trainer: Trainer) -> None:
        """Wire the trainer's parts to the group (nothing to do in one process)."""

    def mean(self, values: Tensor) -> Tensor:
        """Mean of per-sample ``values`` over the batch."""
        return values.mean()

    def normalize_advantages(self, adv: Tensor) -> Tensor:
        """``(A - mean) / (std + 1e-8)`` over the batch."""
        return (adv - adv.mean()) / (adv.std() + 1e-8)

    def sync_statistics(self, collector: Collector) -> None:
        """Merge the observation and reward statistics over ranks (nothing to merge)."""

    def episodes(self, collector: Collector, finished: Sequence[tuple[float, int]]) -> dict:
        """The episode columns of ``progress.csv``."""
        return {
            "episodic_return_mean": collector.recent_return(),
            "episodic_length_mean": collector.recent_length(),
            "episodes": collector.total_episodes,
            "episodes_this_update": len(finished),
        }

    def load_checkpoint(self, directory: Any) -> dict[str, Any]:
        """The run's checkpoint; refuses a data-parallel one (it needs ``--nproc``)."""
        state = load_checkpoint(directory / CHECKPOINT_NAME)
        parallel = state.get("data_parallel")
        if parallel is not None and self.world_size != int(parallel["world_size"]):
            size = int(parallel["world_size"])
            raise ConfigError(
                f"this run was trained with --nproc {size}, not {self.world_size}: resume it "
                f"with --nproc {size} (each rank continues its own environments)"
            )
        return state

    def rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint as this rank sees it (its own per-rank entries)."""
        return state

    def load_env_state(self, directory: Any, digest: str) -> bytes:
        """The pickled environments of :attr:`rank` (trusted resume only)."""
        return load_env_state(directory / CHECKPOINT_NAME, digest)

    def gather_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state rank 0 saves."""
        return state

    def gather_env_state(self, envs: bytes | None) -> bytes | None:
        """The pickled environments rank 0 saves (``None``: not capturable)."""
        return envs

    def callbacks(self, callbacks: list[Callback]) -> list[Callback]:
        """The callbacks this rank runs."""
        return callbacks


class TrackedRunningMeanStd(RunningMeanStd):
    """A :class:`RunningMeanStd` that also keeps what it folded in since the last merge.

    Attributes
    ----------
    synced
        The statistics at the last merge (identical on every rank).
    pending
        The statistics of this rank's samples since (count 0 after a merge).
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        super().__init__(shape, epsilon)
        self._mark()

    @classmethod
    def replacing(cls, rms: RunningMeanStd) -> TrackedRunningMeanStd:
        """A tracked copy of ``rms`` (its statistics become the merged ones)."""
        tracked = cls(rms.mean.shape)
        tracked.load_state_dict(rms.state_dict())
        return tracked

    def _mark(self) -> None:
        self.synced = RunningMeanStd(self.mean.shape)
        self.synced.load_state_dict(super().state_dict())
        self.pending = RunningMeanStd(self.mean.shape, epsilon=0.0)

    def update(self, batch: np.ndarray) -> None:
        """Fold ``batch`` into the statistics and into :attr:`pending`."""
        super().update(batch)
        self.pending.update(batch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics (they count as merged)."""
        super().load_state_dict(state)
        self._mark()


def _fold(rms: RunningMeanStd, mean: np.ndarray, var: np.ndarray, count: float) -> None:
    """Chan et al.'s parallel combination of ``rms`` with a summary ``(mean, var, count)``."""
    if count == 0:
        return
    delta = mean - rms.mean
    total = rms.count + count
    m2 = rms.var * rms.count + var * count + delta**2 * rms.count * count / total
    rms.mean = rms.mean + delta * count / total
    rms.var = m2 / total
    rms.count = total


def _summary(rms: TrackedRunningMeanStd) -> np.ndarray:
    pending = rms.pending
    return np.concatenate([[pending.count], pending.mean.ravel(), pending.var.ravel()])


def merge_statistics(
    tracked: Sequence[TrackedRunningMeanStd], gather: Callable[[np.ndarray], np.ndarray]
) -> None:
    """Fold every rank's pending samples into the merged statistics, in rank order.

    Parameters
    ----------
    tracked
        This rank's statistics (the same list, in the same order, on every rank).
    gather
        ``(L,) -> (ranks, L)``: every rank's float64 row (an all-gather).

    Every rank folds the same rows in the same order, so the results are bit-identical.
    """
    rows = gather(np.concatenate([_summary(rms) for rms in tracked]))
    offset = 0
    for rms in tracked:
        size = rms.mean.size
        merged = copy.deepcopy(rms.synced)
        for row in rows:
            part = row[offset : offset + 1 + 2 * size]
            mean = part[1 : 1 + size].reshape(rms.mean.shape)
            var = part[1 + size :].reshape(rms.mean.shape)
            _fold(merged, mean, var, float(part[0]))
        offset += 1 + 2 * size
        rms.load_state_dict(merged.state_dict())


class _SyncedCheckpoints(Checkpoints):
    """:class:`Checkpoints` whose final decision is rank 0's (others may not see the file)."""

    def __init__(self, every: int, run: DataParallel) -> None:
        super().__init__(every)
        self.run = run

    def on_finish(self, trainer: Trainer) -> None:
        missing = trainer.iteration == 0 or not (trainer.out_dir / CHECKPOINT_NAME).exists()
        if self.run.broadcast_object(missing if self.run.is_writer else None):
            trainer.save()


class DataParallel(LocalRun):
    """One rank of a data-parallel run over an initialized ``torch.distributed`` group.

    Parameters
    ----------
    group
        The process group (default: the world). Every rank must run the same config.

    Raises
    ------
    ConfigError
        ``torch.distributed`` is not initialized.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "data-parallel training needs torch.distributed initialized on every rank: "
                "launch with `natgrad train --nproc K` or `torchrun --nproc_per_node K -m "
                "natgrad train ...`"
            )
        self._dist = dist
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._source = dist.get_global_rank(self.group, 0)

    # -- collectives --------------------------------------------------------------------
    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        self._dist.broadcast_object_list(box, src=self._source, group=self.group)
        return box[0]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        gathered: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        self._dist.all_reduce(tensor, group=self.group)
        return tensor

    def _gather_rows(self, row: np.ndarray) -> np.ndarray:
        local = torch.from_numpy(np.ascontiguousarray(row, dtype=np.float64))
        rows = [torch.empty_like(local) for _ in range(self.world_size)]
        self._dist.all_gather(rows, local, group=self.group)
        return torch.stack(rows).numpy()

    # -- the batch ----------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> None:
        """Distribute the policy update, average critic gradients, track the statistics.

        Raises
        ------
        ConfigError
            The algorithm has no data-parallel form.
        """
        trainer.algo.use_process_group(self.group, self.mean)
        trainer.critic_trainer.sync_grads = self.average_gradients
        collector = trainer.collector
        collector.obs_norm.rms = TrackedRunningMeanStd.replacing(collector.obs_norm.rms)
        scaler = collector.reward_scaler
        scaler.rms = TrackedRunningMeanStd.replacing(scaler.rms)

    def mean(self, values: Tensor) -> Tensor:
        """Mean of per-sample ``values`` over every rank's samples (sums and counts reduced)."""
        local = torch.stack(
            [
                values.detach().double().sum(),
                torch.tensor(float(values.numel()), dtype=torch.float64),
            ]
        )
        total, count = self._all_reduce(local).tolist()
        return torch.tensor(total / count, dtype=values.dtype)

    def normalize_advantages(self, adv: Tensor) -> Tensor:
        """Advantages whitened with the mean and (unbiased) std of the union of the batches."""
        wide = adv.double()
        mean = float(self.mean(wide))
        squares = self._all_reduce(
            torch.stack([((wide - mean) ** 2).sum(), torch.tensor(float(adv.numel())).double()])
        )
        std = float(torch.sqrt(squares[0] / (squares[1] - 1)))
        return ((wide - mean) / (std + 1e-8)).to(adv.dtype)

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Replace each ``.grad`` by its mean over ranks (one all-reduce)."""
        grads = [p.grad for p in params if p.grad is not None]
        flat = self._all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sync_statistics(self, collector: Collector) -> None:
        """Merge the observation and reward statistics of every rank (see the module)."""
        tracked = [collector.obs_norm.rms, collector.reward_scaler.rms]
        merge_statistics(tracked, self._gather_rows)  # type: ignore[arg-type]

    def episodes(self, collector: Collector, finished: Sequence[tuple[float, int]]) -> dict:
        """Episode columns over every rank's recent episodes (each rank's last 20)."""
        recent = list(collector.recent)
        row = np.array(
            [
                sum(r for r, _ in recent),
                sum(n for _, n in recent),
                len(recent),
                collector.total_episodes,
                len(finished),
            ],
            dtype=np.float64,
        )
        total = self._gather_rows(row).sum(axis=0).tolist()
        count = total[2]
        return {
            "episodic_return_mean": total[0] / count if count else math.nan,
            "episodic_length_mean": total[1] / count if count else math.nan,
            "episodes": int(total[3]),
            "episodes_this_update": int(total[4]),
        }

    # -- checkpoints --------------------------------------------------------------------
    def load_checkpoint(self, directory: Any) -> dict[str, Any]:
        """Rank 0 reads the checkpoint and sends it to every rank (no shared disk needed).

        Raises
        ------
        CheckpointError, ConfigError
            On every rank, when rank 0 cannot use the checkpoint.
        """
        reply: Any = None
        if self.is_writer:
            try:
                reply = ("ok", self._read(directory))
            except (CheckpointError, ConfigError) as error:
                reply = (type(error).__name__, str(error))
        reply = self.broadcast_object(reply)
        if reply[0] == "ConfigError":
            raise ConfigError(reply[1])
        if reply[0] != "ok":
            raise CheckpointError(reply[1])
        return reply[1]

    def _read(self, directory: Any) -> dict[str, Any]:
        state = load_checkpoint(directory / CHECKPOINT_NAME)
        parallel = state.get("data_parallel")
        saved = 1 if parallel is None else int(parallel["world_size"])
        if saved != self.world_size:
            how = "without --nproc" if saved == 1 else f"with --nproc {saved}"
            raise ConfigError(
                f"this run was trained {how}, not with {self.world_size} ranks: resume it "
                f"{how} (each rank continues its own environments)"
            )
        return state

    def rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint with this rank's own entries (:data:`RANK_KEYS`)."""
        return {**state, **state["data_parallel"]["ranks"][self.rank]}

    def load_env_state(self, directory: Any, digest: str) -> bytes:
        """Rank 0 reads the verified environments of every rank; each gets its own."""
        saved = self.broadcast_object(
            load_env_state(directory / CHECKPOINT_NAME, digest) if self.is_writer else None
        )
        ranks = pickle.load(io.BytesIO(saved))  # noqa: S301 - only with --trust-env-state
        return ranks["ranks"][self.rank]

    def gather_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with every rank's own entries under ``"data_parallel"`` (on rank 0)."""
        mine = {key: state[key] for key in RANK_KEYS}
        ranks = self.all_gather_object(mine)
        return {**state, "data_parallel": {"world_size": self.world_size, "ranks": ranks}}

    def gather_env_state(self, envs: bytes | None) -> bytes | None:
        """Every rank's pickled environments in one blob (``None`` if any is not capturable)."""
        ranks = self.all_gather_object(envs)
        if any(blob is None for blob in ranks):
            return None
        return pickle.dumps({"format": _ENV_FORMAT, "ranks": ranks})

    def callbacks(self, callbacks: list[Callback]) -> list[Callback]:
        """Rank 0 runs them all; the others neither show progress nor plot."""
        out: list[Callback] = []
        for callback in callbacks:
            if isinstance(callback, Checkpoints):
                out.append(_SyncedCheckpoints(callback.every, self))
            elif self.is_writer or not isinstance(callback, ProgressBar | LearningCurve):
                out.append(callback)
        return out
