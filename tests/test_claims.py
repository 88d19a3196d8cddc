"""Documented claims of RATNaturalGradient that the exactness table does not reach.

Each test names the claim (docstring, README or docs page) and checks it against the
independent dense float64 reference of ``tests/reference.py`` or by observing what ran.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, build
from reference import dense_natural_gradient, dense_scores, reference_log_prob
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from natgrad import RATNaturalGradient
from natgrad.factored import build_factored_scores
from natgrad.scores import MaterializedScores, PolicyScores, StreamingScores, default_log_prob
from natgrad.solvers import cholesky_solve, kaczmarz_solve

N = 24


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def case_named(name: str):
    return next(c for c in CASES if c.name == name)


def reference_for(case, policy, obs, acts, adv, damping, params=None):
    """Dense J (float64), d = (F + lam I)^{-1} g and F = J^T J / N."""
    chosen = params or [p for p in policy.parameters() if p.requires_grad]
    scores = dense_scores(
        policy, case.log_prob_fn or reference_log_prob, obs, acts, chosen, adv.shape[0]
    )
    return scores, dense_natural_gradient(scores, adv, damping)


def close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-8) -> bool:
    return bool(
        torch.linalg.vector_norm(got.to(torch.float64) - expected)
        <= rel * torch.linalg.vector_norm(expected)
    )


# -- step_size: eta = sqrt(2 max_kl / d^T F d) ---------------------------------------------
STEP_SOLVERS = {
    "cholesky": {},
    "cg": {"max_iters": 400, "preconditioner_rank": 0},
    "kaczmarz": {"block_size": 12, "max_epochs": 1000},
}


@pytest.mark.parametrize("solver", list(STEP_SOLVERS))
@pytest.mark.parametrize("name", ["gaussian_mlp", "categorical_cnn", "shared_trunk_subset"])
def test_step_size_is_the_formula_on_the_dense_fisher(name, solver):
    """``NaturalGradient.step_size``: ``sqrt(2 max_kl / d^T F d)`` with ``F = J^T J / N``."""
    case = case_named(name)
    policy, obs, acts, adv = build(case, N)
    params = case.params(policy) if case.params else None
    damping = 1.0 if solver == "kaczmarz" else 0.1  # Kaczmarz: a few dozen epochs
    scores, expected = reference_for(case, policy, obs, acts, adv, damping, params)
    fisher = scores.T @ scores / N
    rat = RATNaturalGradient(
        case.log_prob_fn,
        damping=damping,
        solver=solver,
        tol=1e-12,
        seed=0,
        on_nonconvergence="raise",
        **STEP_SOLVERS[solver],
    )
    result = rat.natural_gradient(policy, obs, acts, adv, params=params)
    assert result.diagnostics.solver == solver
    assert close(flat(result.direction), expected)
    d_fisher_d = float(expected @ fisher @ expected)
    g_dot_d = float((scores.T @ adv / N) @ expected)
    assert result.d_fisher_d == pytest.approx(d_fisher_d, rel=1e-8)
    assert result.g_dot_d == pytest.approx(g_dot_d, rel=1e-8)
    for max_kl in (1e-3, 0.01, 0.5):
        assert result.step_size(max_kl) == pytest.approx(
            math.sqrt(2.0 * max_kl / d_fisher_d), rel=1e-8
        )
    # The quadratic KL model at that step equals max_kl.
    eta = result.step_size(0.01)
    assert 0.5 * eta**2 * d_fisher_d == pytest.approx(0.01, rel=1e-8)


def test_step_size_of_a_zero_direction_is_zero():
    case = case_named("gaussian_mlp")
    policy, obs, acts, adv = build(case, N)
    result = RATNaturalGradient(solver="cholesky").natural_gradient(
        policy, obs, acts, torch.zeros_like(adv)
    )
    assert result.d_fisher_d == 0.0 and result.step_size(0.01) == 0.0
    with pytest.raises(ValueError, match="max_kl must be a finite float > 0"):
        result.step_size(0.0)


# -- parameter order -----------------------------------------------------------------------
def test_results_follow_named_parameters_order_whatever_the_order_given():
    """``__call__``: results follow ``named_parameters()`` order, whatever ``params`` order."""
    case = case_named("shared_trunk_subset")
    policy, obs, acts, adv = build(case, N)
    in_order = [*policy.trunk.parameters(), *policy.actor.parameters()]
    reversed_params = in_order[::-1]
    _, expected = reference_for(case, policy, obs, acts, adv, 0.1, in_order)
    rat = RATNaturalGradient(damping=0.1, solver="cholesky")
    result = rat.natural_gradient(policy, obs, acts, adv, params=reversed_params)
    named = [n for n, _ in policy.named_parameters()]
    assert list(result.param_names) == [n for n in named if n.startswith(("trunk.", "actor."))]
    assert result.param_names == ("trunk.0.weight", "trunk.0.bias", "actor.weight", "actor.bias")
    assert [d.shape for d in result.direction] == [p.shape for p in in_order]
    assert close(flat(result.direction), expected)
    # The user-facing path ignores the given order too.
    adv_t = rat(policy, obs, acts, adv, params=reversed_params)
    grads = torch.autograd.grad(-(adv_t * reference_log_prob(policy, obs, acts)).mean(), in_order)
    assert close(-flat(grads), expected)


# -- backend="auto" and memory_budget ---------------------------------------------------------
class MatmulPolicy(nn.Module):
    """No ``nn.Linear`` layer, so ``backend="auto"`` chooses by ``memory_budget`` alone."""

    def __init__(self, features: int = 30, actions: int = 12):
        super().__init__()
        self.w = nn.Parameter(torch.randn(features, actions) / features**0.5)

    def forward(self, obs):
        return torch.distributions.Categorical(logits=torch.tanh(obs @ self.w))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen operation produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def matmul_batch(n=120):
    torch.manual_seed(0)
    policy = MatmulPolicy().double()
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(n, 30, generator=gen, dtype=torch.float64)
    acts = torch.randint(0, 12, (n,), generator=gen)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    return policy, obs, acts, adv


@pytest.mark.parametrize(
    ("solver", "options"),
    [
        ("kaczmarz", {"max_epochs": 500}),
        ("cg", {"max_iters": 400, "preconditioner_rank": 8}),  # rank <= block_size
    ],
)
def test_memory_budget_switches_to_streaming_with_block_sized_peak(solver, options):
    """``backend="auto"`` materializes ``J`` when it fits in ``memory_budget`` bytes, else
    streams, and streaming never forms a tensor larger than ``block_size x P``."""
    policy, obs, acts, adv = matmul_batch()
    n, p, block = obs.shape[0], policy.w.numel(), 16
    needed = n * p * 8  # float64 J
    expected = dense_natural_gradient(
        dense_scores(policy, reference_log_prob, obs, acts, [policy.w], n), adv, 1.0
    )
    seen = {}
    for budget in (needed, needed - 1):
        rat = RATNaturalGradient(
            damping=1.0,
            solver=solver,
            block_size=block,
            memory_budget=budget,
            tol=1e-11,
            seed=0,
            on_nonconvergence="raise",
            **options,
        )
        with LargestTensor() as mode:
            result = rat.natural_gradient(policy, obs, acts, adv)
        assert result.diagnostics.solver == solver
        assert close(flat(result.direction), expected)
        seen[rat.diagnostics.backend] = mode.largest
    assert set(seen) == {"materialized", "streaming"}
    assert seen["materialized"] >= n * p  # J itself
    assert seen["streaming"] <= block * p, "streaming formed a tensor larger than b x P"


def test_streaming_default_cg_peak_is_block_sized():
    """The default solver on the streaming backend: CG with the default rank-256 Nystrom
    preconditioner. Its kernel columns are taken chunk by chunk, so the largest tensor is
    the preconditioner's own N x r matrix or a chunk of rows, never J (N x P)."""
    policy, obs, acts, adv = matmul_batch()
    n, p, block = obs.shape[0], policy.w.numel(), 16
    # Whole-matrix passes use chunks of max(block_size, rows fitting in memory_budget / 8).
    budget = 8 * block * p * 8
    rat = RATNaturalGradient(
        damping=1.0, solver="cg", block_size=block, backend="streaming", memory_budget=budget
    )
    with LargestTensor() as mode:
        rat(policy, obs, acts, adv)
    assert rat.diagnostics.backend == "streaming" and rat.diagnostics.solver == "cg"
    rank = min(rat.preconditioner_rank, n)
    assert mode.largest <= max(block * p, n * rank) < n * p, (mode.largest, mode.op)


# -- resample_blocks -----------------------------------------------------------------------
class RecordingScores(MaterializedScores):
    """A materialized J that records every block the solver asks for."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.visited: list[list[int]] = []

    def block(self, index):
        self.visited.append(sorted(index.tolist()))
        return super().block(index)


def random_system(n=20, p=15, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, p, generator=gen, dtype=torch.float64) / p**0.5
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    return scores, rhs


@pytest.mark.parametrize("resample", [False, True])
def test_resample_blocks_redraws_the_paving_every_epoch(resample):
    """Each epoch visits a paving of all samples: one fixed paving by default, a fresh one
    every epoch with ``resample_blocks=True``; both reach the exact solution."""
    n, block, epochs = 20, 6, 8
    scores, rhs = random_system(n)
    operator = RecordingScores(scores)
    result = kaczmarz_solve(
        operator, rhs, 0.5, block, epochs, 1e-300, torch.Generator().manual_seed(0), resample
    )
    per_epoch = math.ceil(n / block)
    assert result.iterations == epochs
    assert len(operator.visited) == epochs * per_epoch
    pavings = []
    for e in range(epochs):
        visits = operator.visited[e * per_epoch : (e + 1) * per_epoch]
        assert sorted(i for v in visits for i in v) == list(range(n))  # a paving of all
        pavings.append(sorted(map(tuple, visits)))
    distinct = len(set(map(tuple, pavings)))
    assert distinct == (epochs if resample else 1)
    exact = cholesky_solve(MaterializedScores(scores), rhs, 0.5).x
    assert close(result.x, exact, rel=1e-6)


def test_resample_blocks_reaches_the_dense_reference():
    case = case_named("gaussian_mlp")
    policy, obs, acts, adv = build(case, N)
    _, expected = reference_for(case, policy, obs, acts, adv, 1.0)
    rat = RATNaturalGradient(
        damping=1.0,
        solver="kaczmarz",
        block_size=8,
        max_epochs=1000,
        tol=1e-12,
        seed=0,
        resample_blocks=True,
        on_nonconvergence="raise",
    )
    result = rat.natural_gradient(policy, obs, acts, adv)
    assert result.diagnostics.solver == "kaczmarz"
    assert close(flat(result.direction), expected)


# -- seed=None -----------------------------------------------------------------------------
def test_seed_none_seeds_from_the_operating_system():
    """``seed=None`` seeds from the OS: two objects draw different blocks, both are exact."""
    first, second = RATNaturalGradient(seed=None), RATNaturalGradient(seed=None)
    assert first.seed is None
    assert first.generator.initial_seed() != second.generator.initial_seed()
    same = [RATNaturalGradient(seed=5).generator.initial_seed() for _ in range(2)]
    assert same == [5, 5]
    case = case_named("gaussian_mlp")
    policy, obs, acts, adv = build(case, N)
    _, expected = reference_for(case, policy, obs, acts, adv, 1.0)
    rat = RATNaturalGradient(
        damping=1.0,
        solver="kaczmarz",
        block_size=8,
        max_epochs=1000,
        tol=1e-12,
        seed=None,
        on_nonconvergence="raise",
    )
    assert close(flat(rat.natural_gradient(policy, obs, acts, adv).direction), expected)


# -- score_path for recurrent policies ---------------------------------------------------------
class ProjectedLSTM(nn.Module):
    """An LSTM with ``proj_size``: not unrolled, so vmap meets the fused kernel."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 6, proj_size=4, batch_first=True)
        self.head = nn.Linear(4, 4)

    def forward(self, obs):
        out, _ = self.rnn(obs)
        return torch.distributions.Categorical(logits=self.head(out[:, -1]))


@pytest.mark.parametrize("name", ["gru", "lstm", "gaussian_mlp", "projected_lstm"])
def test_recurrent_policies_report_their_score_path(name):
    """docs/sharp-bits.md: vmap cannot batch the fused GRU/LSTM kernels, so natgrad runs
    nn.RNN/GRU/LSTM unrolled under vmap (``score_path == "vmap"``); a layer it does not
    unroll (LSTM ``proj_size``) is computed one sample at a time, reported as
    ``score_path == "loop"`` with the reason."""
    case = case_named("gru" if name == "projected_lstm" else name)
    policy, obs, acts, adv = build(case, N)
    if name == "projected_lstm":
        torch.manual_seed(0)
        policy = ProjectedLSTM().double()
    _, expected = reference_for(case, policy, obs, acts, adv, 0.1)
    rat = RATNaturalGradient(damping=0.1, solver="cholesky", backend="materialized")
    result = rat.natural_gradient(policy, obs, acts, adv)
    assert close(flat(result.direction), expected)
    notes = [f for f in result.diagnostics.fallbacks if "one sample at a time" in f]
    if name == "projected_lstm":
        assert result.diagnostics.score_path == "loop"
        assert len(notes) == 1 and "vmap failed" in notes[0]
    else:
        assert result.diagnostics.score_path == "vmap" and not notes


# -- cross_gram and the Nystrom preconditioner on every backend ---------------------------------
def operators(policy, obs, acts):
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    with torch.no_grad():
        log_probs = default_log_prob(policy, obs, acts)
    scores = PolicyScores(policy, default_log_prob, obs, acts, names, log_probs)
    factored, reason = build_factored_scores(scores, policy, default_log_prob, obs, acts, 64)
    assert factored is not None, reason
    return {
        "materialized": MaterializedScores.from_policy(scores, 64),
        "streaming": StreamingScores(scores, 5),
        "factored": factored,
    }


@pytest.mark.parametrize("backend", ["materialized", "streaming", "factored"])
def test_cross_gram_is_the_dense_kernel_columns(backend):
    case = case_named("gaussian_mlp")
    policy, obs, acts, _ = build(case, N)
    operator = operators(policy, obs, acts)[backend]
    assert operator.backend == backend
    dense = dense_scores(policy, reference_log_prob, obs, acts, list(policy.parameters()), N)
    for index in (torch.tensor([3, 17, 0, 9, 22]), torch.arange(N)):
        got = operator.cross_gram(index).to(torch.float64)
        torch.testing.assert_close(got, dense @ dense[index].T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["materialized", "streaming", "factored"])
def test_full_rank_nystrom_makes_cg_exact_in_one_iteration(backend):
    """``preconditioner_rank >= N`` uses every sample: ``P = K / N + lam I`` itself, so CG
    finishes in one iteration on every backend (a wrong kernel column would not)."""
    case = case_named("gaussian_mlp")
    policy, obs, acts, adv = build(case, N)
    _, expected = reference_for(case, policy, obs, acts, adv, 1e-2)
    rat = RATNaturalGradient(
        damping=1e-2,
        solver="cg",
        tol=1e-10,
        max_iters=400,
        seed=0,
        backend=backend,
        preconditioner_rank=N,
        on_nonconvergence="raise",
    )
    result = rat.natural_gradient(policy, obs, acts, adv)
    assert result.diagnostics.backend == backend and result.diagnostics.solver == "cg"
    assert result.diagnostics.iterations == 1
    assert close(flat(result.direction), expected, rel=1e-8)
