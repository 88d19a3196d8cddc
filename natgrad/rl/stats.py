"""Aggregate scores over seeds the way the field reports them (Agarwal et al., 2021).

Agarwal, Schwarzer, Castro, Courville & Bellemare, "Deep reinforcement learning at the edge
of the statistical precipice", NeurIPS 2021: report the interquartile mean (IQM) of the
runs' scores with a 95 % stratified-bootstrap confidence interval (runs resampled with
replacement within each task), rather than a mean over a handful of seeds. rliable is
that paper's library; this module is a NumPy-only equivalent of the two statistics natgrad's
benchmarks need (rliable's pinned ``arch < 8`` does not import with pandas 3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from natgrad.rl._errors import ConfigError

__all__ = ["Interval", "iqm", "stratified_bootstrap"]


def iqm(scores: np.ndarray | Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50 % of ``scores`` (all tasks pooled).

    With ``n`` scores sorted, ``floor(n / 4)`` are dropped from each end, as rliable's
    ``aggregate_iqm`` (``scipy.stats.trim_mean(scores, 0.25)``) does: ``n = 5`` keeps the
    middle three, ``n < 4`` keeps all.
    """
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if values.size == 0:
        raise ConfigError("iqm(scores): scores is empty; pass at least one run's score")
    if not np.all(np.isfinite(values)):
        raise ConfigError("iqm(scores): scores holds NaN or inf; drop or fix the failed runs")
    cut = values.size // 4
    return float(values[cut : values.size - cut].mean())


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"


def stratified_bootstrap(
    scores: Mapping[str, Sequence[float]],
    statistic: Callable[[np.ndarray], float] = iqm,
    *,
    reps: int = 5000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``statistic`` of all runs pooled, with a percentile stratified-bootstrap interval.

    Parameters
    ----------
    scores
        Task name -> the scores of its runs (one per seed). Each bootstrap replicate
        resamples every task's runs with replacement, keeping the number of runs per task.
    statistic
        Maps the pooled scores of one replicate to a number (default: :func:`iqm`).
    reps, confidence, seed
        Bootstrap replicates, interval coverage and the resampling seed (deterministic).
    """
    if not isinstance(scores, Mapping):
        raise ConfigError(
            f"stratified_bootstrap(scores): scores must map each task to its runs' scores, "
            f"got {type(scores).__name__}; pass {{task: [score per run]}}"
        )
    if not scores:
        raise ConfigError("stratified_bootstrap(scores): no tasks; pass {task: [scores]}")
    tasks = {name: np.asarray(runs, dtype=np.float64) for name, runs in scores.items()}
    for name, runs in tasks.items():
        if runs.ndim != 1 or runs.size == 0:
            raise ConfigError(
                f"stratified_bootstrap(scores): task {name!r} must hold one score per run "
                f"(a non-empty 1-D sequence), got shape {runs.shape}"
            )
        if not np.all(np.isfinite(runs)):
            raise ConfigError(
                f"stratified_bootstrap(scores): task {name!r} holds NaN or inf; drop or fix "
                "the failed runs"
            )
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"stratified_bootstrap(confidence={confidence}): must be in (0, 1)")
    if reps < 1:
        raise ConfigError(f"stratified_bootstrap(reps={reps}): must be >= 1")
    rng = np.random.default_rng(seed)
    estimate = statistic(np.concatenate(list(tasks.values())))
    replicates = np.empty(reps)
    for r in range(reps):
        resampled = [runs[rng.integers(0, runs.size, runs.size)] for runs in tasks.values()]
        replicates[r] = statistic(np.concatenate(resampled))
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    return Interval(float(estimate), float(low), float(high), confidence)
