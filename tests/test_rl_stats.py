"""IQM and the stratified bootstrap used by the benchmarks' evaluation protocol."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.rl import ConfigError
from natgrad.rl.stats import iqm, stratified_bootstrap


def test_iqm_drops_a_quarter_at_each_end() -> None:
    assert iqm([100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -50.0]) == pytest.approx(3.5, abs=0)
    assert iqm([0.0, 10.0, 20.0, 1000.0, -1000.0]) == pytest.approx(10.0, abs=0)  # middle 3
    assert iqm([7.0, 9.0]) == 8.0  # fewer than 4 runs: the mean


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40))
def test_iqm_equals_the_trimmed_mean(values: list[float]) -> None:
    ordered = sorted(values)
    k = len(values) // 4
    middle = ordered[k : len(values) - k]
    assert iqm(values) == pytest.approx(sum(middle) / len(middle), rel=1e-9, abs=1e-6)
    assert min(values) <= iqm(values) <= max(values)


def test_bootstrap_interval_brackets_the_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    scores = {"a": rng.normal(10, 2, 10), "b": rng.normal(20, 2, 10)}
    first = stratified_bootstrap(scores, reps=500, seed=3)
    assert first == stratified_bootstrap(scores, reps=500, seed=3)
    assert first.low <= first.estimate <= first.high
    assert first.estimate == pytest.approx(iqm(np.concatenate(list(scores.values()))))


def test_bootstrap_resamples_within_tasks() -> None:
    # Two tasks with constant scores: stratified resampling keeps 5 runs of each, so every
    # replicate's mean is exactly 15; pooled (unstratified) resampling would vary.
    interval = stratified_bootstrap({"a": [10.0] * 5, "b": [20.0] * 5}, np.mean, reps=200)
    assert interval.low == interval.high == interval.estimate == 15.0


def test_bootstrap_covers_the_true_mean_about_as_often_as_stated() -> None:
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(100):
        runs = rng.normal(0.0, 1.0, 20)
        ci = stratified_bootstrap({"t": runs}, np.mean, reps=400, seed=trial)
        hits += ci.low <= 0.0 <= ci.high
    assert 85 <= hits <= 100  # nominal 95 %; percentile intervals undercover a little


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: iqm([]), "empty"),
        (lambda: iqm([1.0, float("nan")]), "NaN"),
        (lambda: stratified_bootstrap({}), "no tasks"),
        (lambda: stratified_bootstrap({"a": []}), r"task 'a' must hold one score per run"),
        (lambda: stratified_bootstrap({"a": [[1.0, 2.0]]}), r"task 'a'.*shape \(1, 2\)"),
        (lambda: stratified_bootstrap({"a": [1.0, float("nan")]}), "task 'a' holds NaN"),
        (lambda: stratified_bootstrap([1.0, 2.0]), "must map each task"),
        (lambda: stratified_bootstrap({"a": [1.0]}, confidence=95), "confidence=95"),
        (lambda: stratified_bootstrap({"a": [1.0]}, reps=0), "reps=0"),
    ],
)
def test_bad_input_is_named(call, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        call()
