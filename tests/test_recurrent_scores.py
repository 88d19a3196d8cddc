"""Recurrent layers: exact per-sample scores on the factored and the vmap paths.

Every score is compared with the per-sample reference (``tests/reference.py``: each
sample's gradient taken alone with autograd through the fused kernel, float64) for
``nn.RNN``/``nn.GRU``/``nn.LSTM``, 1 and 2 layers, one or two directions, ``batch_first``
or not, with and without initial states.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import dense_natural_gradient, dense_scores
from torch import Tensor, nn
from torch.distributions import Categorical
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_leaves

from natgrad import RATNaturalGradient
from natgrad._rnn import PackedSequenceError, batched_recurrent, unrolled_forward
from natgrad.errors import NatgradError
from natgrad.factored import build_factored_scores
from natgrad.layers import FACTORABLE_LAYERS
from natgrad.layers.rows import RowsFactor
from natgrad.scores import PolicyScores, default_log_prob

N, T, IN, H = 6, 4, 3, 5
CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
GRID = list(itertools.product(CELLS, [1, 2], [False, True], [False, True], [False, True]))
IDS = [f"{c}-L{n}-{'bi' if b else 'uni'}-{'bf' if f else 'tf'}-{'h0' if h else 'zero'}"
       for c, n, b, f, h in GRID]  # fmt: skip


class SequencePolicy(nn.Module):
    """A recurrent module over ``(N, T, IN)`` observations, logits from the last output.

    With ``initial``, the initial states depend on the observation (and are passed
    positionally, as the hook sees them).
    """

    def __init__(self, cell, layers=1, bidirectional=False, batch_first=True, initial=False):
        super().__init__()
        self.rnn = cell(IN, H, num_layers=layers, bidirectional=bidirectional,
                        batch_first=batch_first)  # fmt: skip
        self.states = layers * (2 if bidirectional else 1)
        self.initial = initial
        self.head = nn.Linear(H * (2 if bidirectional else 1), 4)

    def forward(self, obs: Tensor) -> Categorical:
        x = obs if self.rnn.batch_first else obs.transpose(0, 1)
        if self.initial:
            h0 = torch.tanh(obs[:, 0, :1] * torch.linspace(-1, 1, H, dtype=obs.dtype))
            h0 = h0.expand(self.states, -1, -1)
            hx = (h0, 0.5 * h0) if isinstance(self.rnn, nn.LSTM) else h0
            out, _ = self.rnn(x, hx)
        else:
            out, _ = self.rnn(x)
        last = out[:, -1] if self.rnn.batch_first else out[-1]
        return Categorical(logits=self.head(last))


def batch(policy: nn.Module, n: int = N, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(n, T, IN, generator=gen, dtype=dtype)
    acts = torch.randint(0, 4, (n,), generator=gen)
    adv = torch.randn(n, generator=gen, dtype=dtype)
    return obs, acts, adv


def make(name, layers, bidirectional, batch_first, initial, dtype=torch.float64):
    torch.manual_seed(0)
    policy = SequencePolicy(CELLS[name], layers, bidirectional, batch_first, initial)
    return policy.to(dtype)


def scores_of(policy, obs, acts):
    names = [n for n, _ in policy.named_parameters()]
    with torch.no_grad():
        log_probs = default_log_prob(policy, obs, acts)
    return PolicyScores(policy, default_log_prob, obs, acts, names, log_probs)


def reference(policy, obs, acts):
    return dense_scores(policy, default_log_prob, obs, acts, list(policy.parameters()), len(acts))


def relative(got: Tensor, expected: Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize(("cell", "layers", "bidirectional", "batch_first", "initial"), GRID,
                         ids=IDS)  # fmt: skip
def test_factored_rows_equal_the_per_sample_reference(
    cell, layers, bidirectional, batch_first, initial
):
    policy = make(cell, layers, bidirectional, batch_first, initial)
    obs, acts, _ = batch(policy)
    scores = scores_of(policy, obs, acts)
    operator, reason = build_factored_scores(scores, policy, default_log_prob, obs, acts, 64)
    assert operator is not None, reason
    assert operator.rest is None  # the recurrent module and the head are both factored
    assert any(isinstance(f, RowsFactor) for f in operator.factors)
    assert relative(operator.dense_rows(torch.arange(N)), reference(policy, obs, acts)) <= 1e-8


@pytest.mark.parametrize(("cell", "layers", "bidirectional", "batch_first", "initial"), GRID,
                         ids=IDS)  # fmt: skip
def test_vmap_rows_equal_the_per_sample_reference(
    cell, layers, bidirectional, batch_first, initial
):
    policy = make(cell, layers, bidirectional, batch_first, initial)
    obs, acts, _ = batch(policy)
    scores = scores_of(policy, obs, acts)
    rows = scores.rows(torch.arange(N))
    assert scores.path == "vmap" and scores.fallback_reason is None
    assert relative(rows, reference(policy, obs, acts)) <= 1e-8


@pytest.mark.parametrize("backend", ["auto", "factored", "materialized", "streaming"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_natural_gradient_is_exact_and_reports_its_path(cell, backend):
    policy = make(cell, 2, True, True, True)
    obs, acts, adv = batch(policy)
    rat = RATNaturalGradient(damping=0.1, solver="cholesky", backend=backend)
    result = rat.natural_gradient(policy, obs, acts, adv)
    direction = torch.cat([d.reshape(-1) for d in result.direction])
    expected = dense_natural_gradient(reference(policy, obs, acts), adv, 0.1)
    assert relative(direction, expected) <= 1e-8
    used = "factored" if backend == "auto" else backend
    assert result.diagnostics.backend == used
    assert result.diagnostics.score_path == "vmap"
    assert not result.diagnostics.fallbacks


def test_float32_factors_pass_the_whole_batch_check():
    """The unrolled recomputation rounds differently from the fused kernel: within tolerance."""
    torch.manual_seed(0)
    policy = SequencePolicy(nn.GRU, layers=2, bidirectional=True)
    obs, acts, adv = batch(policy, n=64, dtype=torch.float32)
    rat = RATNaturalGradient(damping=0.1, solver="cholesky")
    rat(policy, obs, acts, adv)
    assert rat.diagnostics.backend == "factored" and not rat.diagnostics.fallbacks


class Variants(nn.Module):
    """RNN with ReLU, a GRU without biases, in sequence."""

    def __init__(self):
        super().__init__()
        self.relu = nn.RNN(IN, H, nonlinearity="relu", batch_first=True)
        self.gru = nn.GRU(H, H, bias=False, batch_first=True)
        self.head = nn.Linear(H, 4)

    def forward(self, obs):
        out, _ = self.gru(self.relu(obs)[0])
        return Categorical(logits=self.head(out[:, -1]))


def test_relu_and_bias_free_layers():
    torch.manual_seed(0)
    policy = Variants().double()
    obs, acts, _ = batch(policy)
    scores = scores_of(policy, obs, acts)
    operator, reason = build_factored_scores(scores, policy, default_log_prob, obs, acts, 64)
    assert operator is not None and operator.rest is None, reason
    expected = reference(policy, obs, acts)
    assert relative(operator.dense_rows(torch.arange(N)), expected) <= 1e-8
    assert relative(scores.rows(torch.arange(N)), expected) <= 1e-8 and scores.path == "vmap"


class KeywordState(SequencePolicy):
    """Passes the initial state by keyword: the forward hook does not see it."""

    def forward(self, obs):
        h0 = torch.tanh(obs[:, 0, :1]).expand(-1, H)[None].contiguous()
        out, _ = self.rnn(obs, hx=h0)
        return Categorical(logits=self.head(out[:, -1]))


def test_unseen_initial_state_fails_the_check_and_falls_back():
    """The trust rule: factors built without the keyword state disagree with autograd."""
    torch.manual_seed(0)
    policy = KeywordState(nn.GRU).double()
    obs, acts, adv = batch(policy)
    rat = RATNaturalGradient(damping=0.1, solver="cholesky", backend="factored")
    result = rat.natural_gradient(policy, obs, acts, adv)
    assert result.diagnostics.backend == "materialized"
    assert any("disagree with autograd" in note for note in result.diagnostics.fallbacks)
    direction = torch.cat([d.reshape(-1) for d in result.direction])
    expected = dense_natural_gradient(reference(policy, obs, acts), adv, 0.1)
    assert relative(direction, expected) <= 1e-8


@pytest.mark.parametrize("cell", list(CELLS))
def test_float32_streaming_products_run_with_gradients_enabled(cell):
    """The solvers run under no_grad; the streaming J^T x is a backward pass through the
    fused kernel, and nn.LSTM's float32 CPU kernel keeps no workspace without grad mode
    (a raw RuntimeError from torch before)."""
    torch.manual_seed(0)
    policy = SequencePolicy(CELLS[cell])
    obs, acts, adv = batch(policy, dtype=torch.float32)
    rat = RATNaturalGradient(damping=0.1, solver="cg", tol=1e-4, backend="streaming")
    result = rat.natural_gradient(policy, obs, acts, adv)
    direction = torch.cat([d.reshape(-1) for d in result.direction])
    double = make(cell, 1, False, True, False)
    expected = dense_natural_gradient(reference(double, obs.double(), acts), adv.double(), 0.1)
    assert relative(direction, expected) <= 1e-3


class Packed(nn.Module):
    """Variable-length sequences through a PackedSequence."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(IN, H, batch_first=True)
        self.head = nn.Linear(H, 4)

    def forward(self, obs):
        lengths = torch.full((obs.shape[0],), T)
        _, h_n = self.rnn(pack_padded_sequence(obs, lengths, batch_first=True,
                                               enforce_sorted=False))  # fmt: skip
        return Categorical(logits=self.head(h_n[-1]))


@pytest.mark.parametrize("backend", ["auto", "materialized", "streaming"])
def test_packed_sequences_are_refused_with_natgrads_error(backend):
    """torch.func cannot differentiate pack_padded_sequence: a clear error, not a guess
    (the per-sample backends called it coupling of samples before)."""
    torch.manual_seed(0)
    policy = Packed().double()
    obs, acts, adv = batch(policy)
    rat = RATNaturalGradient(damping=0.1, solver="cholesky", backend=backend)
    with pytest.raises(PackedSequenceError, match="GRU got a PackedSequence.*padded tensor"):
        rat(policy, obs, acts, adv)
    assert isinstance(PackedSequenceError("x"), NatgradError)
    with pytest.raises(PackedSequenceError, match="padded tensor"):
        unrolled_forward(policy.rnn, pack_padded_sequence(obs, [T] * N, batch_first=True))


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("initial", [False, True])
def test_unrolled_forward_matches_unbatched_and_batched_calls(cell, initial):
    torch.manual_seed(0)
    module = CELLS[cell](IN, H, num_layers=2, bidirectional=True).double()
    for shape in [(T, IN), (T, N, IN)]:
        x = torch.randn(shape, dtype=torch.float64)
        hx = None
        if initial:
            hx = torch.randn((4, H) if len(shape) == 2 else (4, N, H), dtype=torch.float64)
            hx = (hx, -hx) if cell == "lstm" else hx
        got, want = unrolled_forward(module, x, hx), module(x, hx)
        for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_batched_recurrent_restores_the_fused_forward():
    policy = SequencePolicy(nn.LSTM)
    with pytest.raises(KeyError), batched_recurrent(policy):
        assert "forward" in policy.rnn.__dict__
        raise KeyError("inside")
    assert "forward" not in policy.rnn.__dict__


def test_projected_lstm_is_left_to_the_generic_scores():
    torch.manual_seed(0)
    policy = SequencePolicy(nn.LSTM).double()
    policy.rnn = nn.LSTM(IN, 2 * H, proj_size=H, batch_first=True).double()
    obs, acts, adv = batch(policy)
    scores = scores_of(policy, obs, acts)
    operator, _ = build_factored_scores(scores, policy, default_log_prob, obs, acts, 64)
    assert operator is not None and operator.rest is not None  # only the head is factored
    assert set(FACTORABLE_LAYERS) >= {nn.RNN, nn.GRU, nn.LSTM}
    assert relative(operator.dense_rows(torch.arange(N)), reference(policy, obs, acts)) <= 1e-8


def test_inter_layer_dropout_in_eval_mode_is_factored():
    torch.manual_seed(0)
    policy = SequencePolicy(nn.LSTM, layers=2).double()
    policy.rnn.dropout = 0.3
    policy.eval()
    obs, acts, adv = batch(policy)
    rat = RATNaturalGradient(damping=0.1, solver="cholesky")
    direction = torch.cat(
        [d.reshape(-1) for d in rat.natural_gradient(policy, obs, acts, adv).direction]
    )
    assert rat.diagnostics.backend == "factored" and rat.diagnostics.score_path == "vmap"
    expected = dense_natural_gradient(reference(policy, obs, acts), adv, 0.1)
    assert relative(direction, expected) <= 1e-8


def test_rows_factor_products_equal_dense_ones():
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    positions = torch.tensor([6, 1, 3, 0])
    factor = RowsFactor(rows, positions)
    dense = torch.zeros(5, 7, dtype=torch.float64)
    dense[:, positions] = rows
    v, x = torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    index = torch.tensor([4, 0])
    assert torch.allclose(factor.matvec(v), dense @ v)
    assert torch.allclose(factor.rmatvec(x), (dense.T @ x)[positions])
    assert torch.allclose(factor.magnitude(x), (dense.abs().T @ x.abs())[positions])
    assert torch.allclose(factor.cross_gram(factor.take(index)), dense @ dense[index].T)
    assert torch.allclose(factor.squared_norms(), (dense**2).sum(1))
    assert torch.equal(factor.take(index).dense_rows(), rows[index])


def test_tuple_outputs_get_zero_gradients_where_they_do_not_require_grad():
    from natgrad.factored import _grouped_output_gradients

    weight = torch.tensor(2.0, requires_grad=True)
    used, unused = weight * torch.arange(3.0), torch.ones(2)
    single = weight * torch.ones(1)
    total = (used**2).sum() + 5 * single.sum()
    (pair, alone) = _grouped_output_gradients(total, [(used, (unused,)), single])
    assert torch.allclose(pair[0], 2 * used.detach()) and torch.equal(pair[1], torch.zeros(2))
    assert torch.allclose(alone, torch.tensor([5.0]))
