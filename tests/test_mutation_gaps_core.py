"""Tests for the gaps that mutation testing found in rat.py, scores.py, factored.py,
operators.py, layers/ and supervised/ (benchmarks/mutations/mutation_report.md).

Each test names the surviving mutants it kills.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from torch import nn

from natgrad import NonFiniteError, RATNaturalGradient, SampleCouplingError
from natgrad.factored import build_factored_scores, check_weights, verify_on_batch
from natgrad.scores import MaterializedScores, PolicyScores, StreamingScores
from natgrad.solvers import RL_AGENT
from natgrad.supervised import (
    NaturalGradientOptimizer,
    SupervisedNaturalGradient,
    natural_gradient,
)
from natgrad.supervised.fisher import exact_fisher_quadratic
from natgrad.supervised.jacobians import _check_consistent


class Bilinear(nn.Module):
    """A policy with no registered layer: scores take the generic (per-sample) path."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(4, 3, dtype=torch.float64))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ni,ij->nj", obs, self.weight) * self.scale


def log_prob(policy: nn.Module, obs: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=policy(obs)).log_prob(acts)


def batch(n: int = 200):
    torch.manual_seed(0)
    policy = Bilinear()
    obs = torch.randn(n, 4, dtype=torch.float64)
    return policy, obs, torch.randint(0, 3, (n,)), torch.randn(n, dtype=torch.float64)


def test_the_default_memory_budget_is_one_gibibyte() -> None:
    # kills rat.py:203 and rat.py:240 (2**30 -> 2**29, 2**31, 3**30, 2 + 30, 2 * 30)
    assert RATNaturalGradient(log_prob).memory_budget == 2**30
    assert RATNaturalGradient.from_options(RL_AGENT).memory_budget == 2**30


def test_generic_scores_under_auto_are_materialized_without_a_note() -> None:
    # kills rat.py:480 (a spurious "backend='factored' unavailable" note under "auto")
    policy, obs, acts, adv = batch()
    rat = RATNaturalGradient(log_prob, damping=0.1, solver="cholesky")
    rat(policy, obs, acts, adv)
    assert rat.diagnostics.backend == "materialized"
    assert not any("unavailable" in note for note in rat.diagnostics.fallbacks)


def test_overflowing_a_tilde_names_the_bound_it_reached() -> None:
    # kills rat.py:390 (|A| / damping -> |A| * damping in the message)
    policy, obs, acts, _ = batch(20)
    adv = torch.full((20,), 1e300, dtype=torch.float64)
    adv[::2] = -1e300
    damping = 1e-9
    rat = RATNaturalGradient(log_prob, damping=damping, solver="cholesky")
    with pytest.raises(NonFiniteError) as caught:
        rat(policy, obs, acts, adv)
    bound = f"{1e300 / damping:.3g}"  # "inf": the bound itself is beyond float64
    assert f"|A| / damping = {bound}" in str(caught.value), str(caught.value)


def test_streaming_gram_over_several_chunks_equals_the_dense_one() -> None:
    # kills scores.py:345 (rows_j is rows_i -> is not: off-diagonal chunks from the wrong rows)
    policy, obs, acts, adv = batch(40)
    rat = RATNaturalGradient(log_prob, damping=0.1)
    scores: PolicyScores = rat._prepare(policy, obs, acts, adv, None)[0]
    dense = MaterializedScores.from_policy(scores, 40).gram()
    streamed = StreamingScores(scores, 16).gram()  # chunks of 16, 16 and 8 samples
    assert torch.allclose(streamed, dense, rtol=1e-12, atol=1e-12)


def test_streaming_squared_norms_are_the_rows_squared_norms() -> None:
    # kills scores.py:335 (** 2 -> ** 3, ** 1): the trace the conditioning estimate uses
    policy, obs, acts, adv = batch(40)
    scores = RATNaturalGradient(log_prob, damping=0.1)._prepare(policy, obs, acts, adv, None)[0]
    dense = MaterializedScores.from_policy(scores, 40)
    expected = (dense.matrix**2).sum(dim=1)
    assert torch.allclose(StreamingScores(scores, 16).squared_norms(), expected, rtol=1e-12)


def _scores_with_log_probs(log_probs: list[float]) -> PolicyScores:
    policy, obs, acts, adv = batch(len(log_probs))
    scores = RATNaturalGradient(log_prob, damping=0.1)._prepare(policy, obs, acts, adv, None)[0]
    scores.log_probs = torch.tensor(log_probs, dtype=torch.float64)
    return scores


def test_consistency_tolerance_is_relative_with_an_absolute_floor() -> None:
    # kills scores.py:215 ((1 + |lp|) -> (0 + |lp|), tol * (1 + |lp|) -> tol / (1 + |lp|))
    scores = _scores_with_log_probs([0.0, -50.0])
    tol = scores._consistency_tol
    rows = torch.zeros(2, scores.num_params, dtype=torch.float64)
    index = torch.arange(2)
    # within tol of a log-probability of 0 (the absolute floor) and within 50 tol of -50
    scores._check(rows, torch.tensor([0.5 * tol, -50.0 + 40 * tol]), index)
    with pytest.raises(SampleCouplingError):
        scores._check(rows, torch.tensor([2 * tol, -50.0]), index)
    with pytest.raises(SampleCouplingError):
        scores._check(rows, torch.tensor([0.0, -50.0 + 60 * tol]), index)


def test_the_coupling_error_names_the_sample_furthest_beyond_its_tolerance() -> None:
    # kills scores.py:217 (gap - allowed -> gap * allowed, gap + allowed: the sample named)
    # sample 0 is off by 1.0 (tolerance ~2e-7), sample 1 by 0.99 (tolerance ~0.1): sample 0
    # is further beyond its tolerance, although gap * tolerance or gap + tolerance is not
    scores = _scores_with_log_probs([-1.0, -1e6])
    rows = torch.zeros(2, scores.num_params, dtype=torch.float64)
    values = torch.tensor([-1.0 + 1.0, -1e6 + 0.99])
    with pytest.raises(SampleCouplingError, match=r"\(sample 0: 0 alone vs -1 in the batch\)"):
        scores._check(rows, values, torch.arange(2))


def _factored_and_reference(n: int):
    """A factored MLP operator and the autograd J^T w that verify_on_batch compares it to."""
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    obs, acts = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    adv = torch.randn(n, dtype=torch.float64)
    rat = RATNaturalGradient(log_prob, damping=0.1)
    scores = rat._prepare(policy, obs, acts, adv, None)[0]
    operator, reason = build_factored_scores(scores, policy, log_prob, obs, acts, n)
    assert operator is not None, reason
    weights = check_weights(n, obs.device)
    total = (weights * log_prob(policy, obs, acts)).sum()
    grads = torch.autograd.grad(total, list(policy.parameters()))
    reference = dict(zip([k for k, _ in policy.named_parameters()], grads, strict=True))
    size = torch.zeros(operator.num_params, dtype=torch.float64)
    for factor in operator.factors:
        size[factor.positions] = factor.magnitude(weights).to(torch.float64)
    return operator, reference, size


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_factored_verification_tolerance_is_64_eps_sqrt_n(factor: float) -> None:
    # kills factored.py:420 (64 eps n**0.5 -> n / 0.5, n**1.5 [looser]; / n**0.5,
    # n**-0.5 [tighter]): a disagreement of 0.5x the tolerance passes, 2x is caught
    n = 64
    operator, reference, size = _factored_and_reference(n)
    assert verify_on_batch(operator, reference, torch.float64) is None
    name = "0.weight"
    where = operator.param_positions[name]
    allowed = 64 * torch.finfo(torch.float64).eps * n**0.5 * float(size[where].norm())
    bump = torch.zeros_like(reference[name]).reshape(-1)
    bump[0] = factor * allowed
    shifted = {**reference, name: reference[name] + bump.reshape(reference[name].shape)}
    assert verify_on_batch(operator, shifted, torch.float64) == (name if factor > 1 else None)


# ------------------------------------------------------------------ supervised/


def _classifier(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes)).double()


def test_supervised_result_is_immutable_and_counts_its_rows_and_time() -> None:
    # kills natural_gradient.py:49 (frozen=False), :263 (seconds = now * start), :282
    # (num_rows = rows.shape[1])
    model, x = _classifier(), torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    started = time.perf_counter()
    result = SupervisedNaturalGradient("cross_entropy", damping=0.1)(model, x, y)
    elapsed = time.perf_counter() - started
    assert result.num_rows == 10 * 3  # exact Fisher: k = 3 rows per sample
    assert 0.0 <= result.diagnostics.seconds <= elapsed
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.loss = 0.0


def test_binary_cross_entropy_with_two_logits_is_accepted_one_logit_is_not() -> None:
    # kills natural_gradient.py:411 (C < 2 -> C <= 2; shape[1] -> shape[0])
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    natural_gradient(_classifier(2), x, y, loss="cross_entropy", damping=0.1)
    with pytest.raises(ValueError, match="C >= 2 classes"):
        natural_gradient(_classifier(1), x, torch.zeros(6, dtype=torch.long), "cross_entropy")


def test_scalar_inputs_and_outputs_are_natgrads_errors() -> None:
    # kills natural_gradient.py:388 (first.dim() > 0 -> > -1) and :406 (raw.dim() == 0 ->
    # == -1): a 0-d tensor reached shape[0] (IndexError) instead of natgrad's message
    model = _classifier()
    with pytest.raises((ValueError, TypeError), match="inputs"):
        natural_gradient(model, torch.tensor(1.0, dtype=torch.float64), torch.tensor([0]))

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ self.w).sum()

    with pytest.raises(ValueError, match="first output dimension must be the sample"):
        natural_gradient(Scalar(), torch.randn(5, 4, dtype=torch.float64), torch.randn(()))


def test_non_finite_output_names_its_sample() -> None:
    # kills natural_gradient.py:418 (~ -> +, -, not; [0, 0] -> [0, -1], [1, 0])
    class Pole(nn.Module):  # finite inputs, one infinite output where x[:, 0] == 0.5
        def __init__(self) -> None:
            super().__init__()
            self.head = _classifier()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.head(x)  # one entry of sample 3 only: logit 1 over a pole
            return torch.cat([logits[:, :1], logits[:, 1:2] / (x[:, :1] - 0.5), logits[:, 2:]], 1)

    x = torch.randn(6, 4, dtype=torch.float64)
    x[3, 0] = 0.5  # only sample 3's outputs are non-finite
    with pytest.raises(NonFiniteError, match="not finite for sample 3;"):
        natural_gradient(Pole(), x, torch.randint(0, 3, (6,)), loss="cross_entropy")


def test_a_negative_class_index_is_named() -> None:
    # kills natural_gradient.py:464 (targets < 0 -> targets < -1 when picking the bad index)
    y = torch.tensor([0, 1, -1, 2])
    with pytest.raises(ValueError, match=r"class index -1 outside \[0, 3\)"):
        natural_gradient(_classifier(), torch.randn(4, 4, dtype=torch.float64), y, "cross_entropy")


def test_cross_entropy_loss_value_is_torchs() -> None:
    # kills fisher.py:135 (log_p.gather(1, ...) -> gather(0, ...)): N != classes
    model, x = _classifier(), torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    result = SupervisedNaturalGradient("cross_entropy", damping=0.1)(model, x, y)
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(x), y))
    assert result.loss == pytest.approx(expected, rel=1e-12)


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=0)


def test_cross_entropy_fisher_quadratic_is_the_logit_hessians() -> None:
    # kills fisher.py:162 (softmax dim=1 -> 0, 2) and :163 (- -> /, p * -> p +): t^T F t
    # against the Hessian of logsumexp (the cross-entropy's Hessian in the logits)
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    jt = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    expected = (
        sum(
            float(jt[i] @ torch.autograd.functional.hessian(_logsumexp, outputs[i]) @ jt[i])
            for i in range(5)
        )
        / 5
    )
    assert exact_fisher_quadratic(outputs, jt, "cross_entropy") == pytest.approx(expected)


def test_output_consistency_tolerance() -> None:
    # kills jacobians.py:126 (float64 test negated; float32 2e-3 -> 1.002), :128 ((1 + |f|)
    # -> (1 * |f|)), :130 (the sample named: [0, 0] -> [0, -1])
    batched = torch.zeros(6, 3, dtype=torch.float64)
    _check_consistent(batched + 5e-8, batched)  # float64: 1e-7 (1 + |f|)
    with pytest.raises(ValueError, match="output for sample 4 differs"):
        shifted = batched.clone()
        shifted[4, 1] = 1e-4
        _check_consistent(shifted, batched)
    batched32 = torch.zeros(6, 3)
    _check_consistent(batched32 + 1e-3, batched32)  # float32: 2e-3 (1 + |f|), at f = 0
    with pytest.raises(ValueError, match="output for sample 2 differs"):
        shifted32 = batched32.clone()
        shifted32[2, 1] = 0.1
        _check_consistent(shifted32, batched32)


def _regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    return model, x, torch.sin(3 * x[:, :1])


def test_optimizer_options_bounds() -> None:
    # kills optimizer.py:182 (min > max -> >=) and :194 (0 <= momentum -> -1 <= momentum)
    model, _, _ = _regression()
    NaturalGradientOptimizer(model, damping_schedule="levenberg_marquardt", damping=0.1,
                             min_damping=0.1, max_damping=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=r"momentum must be a float in \[0, 1\)"):
        NaturalGradientOptimizer(model, momentum=-0.5)


def test_lm_step_info_ratio_and_immutability() -> None:
    # kills optimizer.py:27 (StepInfo frozen=False), :270 (predicted < 0 -> < -1: a small
    # predicted decrease still gets its ratio; and -> or: no ratio when the model predicts
    # an increase, as an overlong step does)
    model, x, y = _regression()
    small = NaturalGradientOptimizer(model, loss="mse", lr=1e-3, damping=0.1,
                                     damping_schedule="levenberg_marquardt")  # fmt: skip
    info = small.step(x * 1e-3, y * 1e-3)  # a tiny problem: predicted in (-1, 0)
    assert -1.0 < info.predicted_change < 0.0 and info.reduction_ratio is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.loss = 0.0
    model, x, y = _regression()
    overlong = NaturalGradientOptimizer(model, loss="mse", lr=3.0, damping=1e-3,
                                        damping_schedule="levenberg_marquardt")  # fmt: skip
    info = overlong.step(x, y)
    assert info.predicted_change > 0.0 and info.reduction_ratio is None  # 3x the Gauss-Newton step
    # no ratio, but the loss rose: the damping grows by lm_factor (1.5) as after a poor ratio
    assert info.loss_after > info.loss
    assert info.next_damping == pytest.approx(info.damping * 1.5)


def test_capturing_layer_calls_leaves_no_hook_behind() -> None:
    # kills layers/_base.py:141 (the forward hooks were never removed)
    policy, obs, acts, adv = batch(20)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    RATNaturalGradient(log_prob, damping=0.1)(mlp, obs, acts, adv)
    assert all(not m._forward_hooks for m in mlp.modules())


class SequenceHead(nn.Module):
    """An nn.Linear applied to (N, T, features): not a factorable (N, in) call."""

    def __init__(self) -> None:
        super().__init__()
        self.per_step = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.per_step(obs)).mean(dim=1))


def test_a_linear_layer_on_a_sequence_is_left_to_the_generic_path() -> None:
    # kills layers/linear.py:69 (dim() == 2 and rows == N -> or): the (N, T, in) call
    # would be factored as if it had N * T rows, the verification would reject the whole
    # factored operator, and the result would silently lose the factored speed-up
    torch.manual_seed(0)
    policy = SequenceHead().double()
    obs = torch.randn(16, 6, 4, dtype=torch.float64)
    acts, adv = torch.randint(0, 3, (16,)), torch.randn(16, dtype=torch.float64)
    rat = RATNaturalGradient(log_prob, damping=0.1, solver="cholesky")
    rat(policy, obs, acts, adv)
    assert rat.diagnostics.backend == "factored"
    assert not any("disagree" in note for note in rat.diagnostics.fallbacks)


class PerStepConv(nn.Module):
    """A Conv1d applied to every time step of (N, T, C, L) as one (N * T, C, L) batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        n, t = obs.shape[:2]
        features = torch.tanh(self.conv(obs.reshape(n * t, *obs.shape[2:])))
        return self.head(features.mean(dim=2).reshape(n, t, 3).mean(dim=1))


def test_a_conv_called_on_more_than_n_rows_is_left_to_the_generic_path() -> None:
    # kills layers/conv.py:77 and :78 (and -> or in usable()): the (N * T, C, L) call would be
    # factored with N * T rows, rejected by the verification with the whole factored operator
    torch.manual_seed(0)
    policy = PerStepConv().double()
    obs = torch.randn(12, 4, 2, 7, dtype=torch.float64)
    acts, adv = torch.randint(0, 3, (12,)), torch.randn(12, dtype=torch.float64)
    rat = RATNaturalGradient(log_prob, damping=0.1, solver="cholesky")
    rat(policy, obs, acts, adv)
    assert rat.diagnostics.backend == "factored"
    assert not any("disagree" in note for note in rat.diagnostics.fallbacks)
